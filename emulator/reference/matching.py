"""PS3.4 C.2.2.2 attribute matching as SQL, shared by the Archive's and the TMS's C-FIND.

Single value (case-sensitive), universal (empty), wildcard (* ?), UID list and DA/TM/DT
range matching each become one SQL condition over an index column.
"""

from __future__ import annotations

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

RANGE_VRS = {"DA", "TM", "DT"}


def _glob_pattern(value: str) -> str:
    """A DICOM wildcard value as an SQLite GLOB pattern (case-sensitive, '[' escaped)."""
    return value.replace("[", "[[]")


class UnreadableIdentifier(ValueError):
    """An identifier element whose value does not decode (wrong length, broken sequence)."""


def ensure_readable(identifier: Dataset, depth: int = 0) -> None:
    """Decodes every element, sequences included, so a malformed value is refused up
    front with a reason instead of failing halfway through matching (tests/test_fuzz.py)."""
    try:
        for element in identifier:
            if element.VR == "SQ" and depth < 8:
                for item in element.value or []:
                    ensure_readable(item, depth + 1)
    except UnreadableIdentifier:
        raise
    except Exception as exc:  # pydicom raises many types for bytes it cannot decode
        raise UnreadableIdentifier(f"unreadable identifier element: {exc}"[:200]) from exc


def element_text(element: DataElement) -> str:
    """The matching value of a request element; a UID list arrives multi-valued."""
    if element.value is None:
        return ""
    if element.VM > 1:
        return "\\".join(str(v) for v in element.value)
    return str(element.value).strip()


def condition(column: str, vr: str, value: str) -> tuple[str, list[str]]:
    """SQL for one non-empty matching key; callers skip empty (universal) keys."""
    if vr == "UI":
        uids = [u.strip() for u in value.split("\\") if u.strip()]
        return f"{column} IN ({', '.join('?' * len(uids))})", uids
    if vr in RANGE_VRS and "-" in value:
        low, _, high = value.partition("-")
        parts, params = [], []
        if low:
            parts.append(f"{column} >= ?")
            params.append(low)
        if high:
            parts.append(f"{column} <= ?")
            # A time or date-time bound includes the whole of its last given unit.
            params.append(high if vr == "DA" else high + "\uffff")
        return " AND ".join(parts) or "1", params
    if "*" in value or "?" in value:
        return f"{column} GLOB ?", [_glob_pattern(value)]
    if vr == "IS":
        return f"CAST({column} AS INTEGER) = CAST(? AS INTEGER)", [value]
    return f"{column} = ?", [value]
