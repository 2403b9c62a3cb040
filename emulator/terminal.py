"""The rich console every command prints through.

On a terminal rich fits its width. Piped or redirected, rich would assume 80 columns and
wrap each table cell into a column of fragments (a UPS label over five lines); there a
line is as long as it needs to be, up to 200 columns, unless ``COLUMNS`` says otherwise.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

PIPED_WIDTH = 200


def console(stderr: bool = False) -> Console:
    """A console for stdout (or stderr) that does not wrap tables when piped."""
    stream = sys.stderr if stderr else sys.stdout
    width = None
    if not stream.isatty() and "COLUMNS" not in os.environ:
        width = PIPED_WIDTH
    return Console(stderr=stderr, width=width)
