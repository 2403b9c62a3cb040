"""The source a simulated afterloader holds today.

A clinic exchanges an HDR source every few months; the profile gives the first exchange
and the interval, so the source loaded on any date is the one calibrated at the last
exchange before it: its strength stays within one interval's decay (91 days of Ir-192:
a factor 2.35) whatever day the emulator runs.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from devices.afterloader import BrachySource


def loaded_source(profile: dict[str, Any], now: dt.datetime | None = None) -> BrachySource:
    """The source in the machine at ``now`` (default: the present), as calibrated."""
    source = profile["source"]
    now = now or dt.datetime.now()
    first = dt.datetime.fromisoformat(str(source["first_exchange"]))
    every = dt.timedelta(days=float(source["exchange_every_days"]))
    exchanges = max(0, int((now - first) / every))
    return BrachySource(
        isotope=str(source["isotope"]),
        half_life_days=float(source["half_life_days"]),
        reference_air_kerma_rate=float(source["reference_air_kerma_rate"]),
        reference=first + exchanges * every,
    )
