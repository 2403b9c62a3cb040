"""Soak runs: many emulated devices for a long time, and a verdict at the end."""

from __future__ import annotations

from pathlib import Path


def locustfile_path() -> Path:
    """The packaged locustfile, for ``locust -f`` on machines that run only Locust workers."""
    return Path(__file__).with_name("locustfile.py")
