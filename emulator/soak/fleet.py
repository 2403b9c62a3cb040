"""Which devices a soak run starts: the ``--mix`` of units, stations and AE titles.

A unit is what one treatment room needs to complete a session on its own: a PDS alone, a
PPS and a TDD sharing one station, or an HDR afterloader. A PPS or a TDD alone would leave
half of every session SCHEDULED and its station would never be fed again, so the mix
accepts whole units only.

An afterloader's station carries ``HDR`` in its code: the TMS that feeds the soak (in
process or ``tdw-emu tms --feed``) seeds brachytherapy patients there, linac patients
elsewhere (:func:`station_kind`).
"""

from __future__ import annotations

from dataclasses import dataclass

UNITS = {"pds": ("pds",), "pps+tdd": ("pps", "tdd"), "afterloader": ("afterloader",)}
AFTERLOADER_MARK = "HDR"


def station_kind(station: str) -> str:
    """The patients a soak station is fed: ``afterloader`` (HDR) or ``linac``."""
    return "afterloader" if AFTERLOADER_MARK in station else "linac"


class FleetError(ValueError):
    """A ``--mix`` or device count that cannot be laid out."""


@dataclass(frozen=True)
class FleetMember:
    kind: str
    station: str
    ae_title: str
    index: int  # from 1 across the whole fleet: seeds, and a worker's share


def parse_mix(text: str | None) -> dict[str, float]:
    """``pds=0.5,pps+tdd=0.5`` to weights by unit; empty means PDS only."""
    if not text:
        return {"pds": 1.0}
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        name = name.strip().lower()
        if name not in UNITS:
            raise FleetError(f"unknown unit {name!r} in --mix; choose {', '.join(UNITS)}")
        try:
            weights[name] = float(value) if value else 1.0
        except ValueError as exc:
            raise FleetError(f"--mix weight for {name} must be a number, not {value!r}") from exc
        if weights[name] < 0:
            raise FleetError(f"--mix weight for {name} must not be negative")
    if not sum(weights.values()):
        raise FleetError("--mix gives every unit weight 0")
    return weights


def plan_fleet(devices: int, mix: dict[str, float], prefix: str = "SOAK") -> list[FleetMember]:
    """``devices`` emulated devices laid out by weight; a remainder that cannot make a
    PPS+TDD pair becomes a PDS, so the count is exactly what was asked for."""
    if devices < 1:
        raise FleetError("--devices must be at least 1")
    total = sum(mix.values())
    pair_devices = afterloaders = 0
    if "pps+tdd" in mix:
        pair_devices = round(devices * mix["pps+tdd"] / total) // 2 * 2
    if "afterloader" in mix:
        afterloaders = min(round(devices * mix["afterloader"] / total), devices - pair_devices)
    pds_devices = devices - pair_devices - afterloaders
    members: list[FleetMember] = []
    station_index = 0
    for _ in range(pds_devices):
        station_index += 1
        station = f"{prefix}{station_index:03d}"
        members.append(FleetMember("pds", station, f"PDS{station_index:03d}", len(members) + 1))
    for _ in range(pair_devices // 2):
        station_index += 1
        station = f"{prefix}{station_index:03d}"
        for kind in UNITS["pps+tdd"]:
            members.append(
                FleetMember(kind, station, f"{kind.upper()}{station_index:03d}", len(members) + 1)
            )
    for number in range(1, afterloaders + 1):
        station = f"{prefix}{AFTERLOADER_MARK}{number:03d}"
        members.append(FleetMember("afterloader", station, f"AL{number:03d}", len(members) + 1))
    return members
