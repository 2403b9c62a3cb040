"""Loads Part 10 files from disk into a store through the same admission as a C-STORE.

Used to preload an Archive (``tdw-emu archive --import``) so the data a TMS vendor brings
is checked exactly as if a planning system had sent it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from emulator.store.admission import AdmissionError, AdmissionLimits, admit
from emulator.store.object_store import ObjectStore, StoreOutcome


def import_files(
    store: ObjectStore, paths: Iterable[Path], limits: AdmissionLimits | None = None
) -> dict[Path, StoreOutcome | AdmissionError]:
    """Stores each file; the result maps every path to its outcome or its refusal."""
    results: dict[Path, StoreOutcome | AdmissionError] = {}
    for path in paths:
        encoded = Path(path).read_bytes()
        try:
            header = admit(encoded, limits=limits)
        except AdmissionError as exc:
            results[path] = exc
            continue
        results[path] = store.put(encoded, header, calling_ae="import")
    return results


def dicom_files(root: Path) -> list[Path]:
    """Every ``*.dcm`` below ``root`` (or ``root`` itself), in a stable order; a ``root``
    that does not exist is a set-up mistake (ValueError), not an import of nothing."""
    root = Path(root)
    if not root.exists():
        raise ValueError(f"{root} does not exist: nothing to import from it")
    return [root] if root.is_file() else sorted(p for p in root.rglob("*.dcm") if p.is_file())
