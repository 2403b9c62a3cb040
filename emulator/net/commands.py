"""DIMSE Command Field values (PS3.7 Annex E) and the message names used in logs and metrics."""

from __future__ import annotations

COMMANDS = {
    0x0001: "C-STORE-RQ",
    0x8001: "C-STORE-RSP",
    0x0010: "C-GET-RQ",
    0x8010: "C-GET-RSP",
    0x0020: "C-FIND-RQ",
    0x8020: "C-FIND-RSP",
    0x0021: "C-MOVE-RQ",
    0x8021: "C-MOVE-RSP",
    0x0030: "C-ECHO-RQ",
    0x8030: "C-ECHO-RSP",
    0x0FFF: "C-CANCEL-RQ",
    0x0100: "N-EVENT-REPORT-RQ",
    0x8100: "N-EVENT-REPORT-RSP",
    0x0110: "N-GET-RQ",
    0x8110: "N-GET-RSP",
    0x0120: "N-SET-RQ",
    0x8120: "N-SET-RSP",
    0x0130: "N-ACTION-RQ",
    0x8130: "N-ACTION-RSP",
    0x0140: "N-CREATE-RQ",
    0x8140: "N-CREATE-RSP",
    0x0150: "N-DELETE-RQ",
    0x8150: "N-DELETE-RSP",
}


def message_name(command_field: int) -> str:
    """``C-FIND-RQ`` for 0x0020; ``UNKNOWN`` for a value PS3.7 does not define."""
    return COMMANDS.get(command_field, "UNKNOWN")


def operation_of(name: str) -> str:
    """``C-FIND`` for ``C-FIND-RQ`` or ``C-FIND-RSP``."""
    return name.rsplit("-", 1)[0]
