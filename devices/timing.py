"""The timing budget of protocol v2 (hil/PROTOCOL.md, "Timing"): what a controller
promises in its HELLO_REPLY, and what the host waits for.

A host cannot know how long a 360 degree gantry rotation or a CBCT takes on a given
machine, so it does not guess: the controller states its cadence and its longest
operations, sends PROGRESS while busy, and the host gives up on an operation only when it
has heard nothing about it for ``silence_s`` or it ran past its stated maximum. A rig may
override any figure in the device URL (``?silence_s=10``) or the YAML config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

LONG_OPERATIONS = ("LOAD_BEAM", "MOVE_COUCH", "ACQUIRE")


@dataclass(frozen=True)
class TimingBudget:
    """Seconds, wall-clock. ``max_s`` holds the longest each long operation may take."""

    progress_interval_s: float = 1.0  # PROGRESS at least this often while busy
    tick_s: float = 0.2  # METERSET at least this often while a beam is on
    silence_s: float = 5.0  # the host gives up on an operation unheard of for this long
    heartbeat_s: float = 0.5  # the host's HEARTBEAT cadence when it is waiting or idle
    hello_s: float = 5.0  # HELLO_REPLY within this, before any budget is known
    # After the link dies with a beam on, how long the host keeps reconnecting to read the
    # controller's own count of that beam-on (HELLO_REPLY last_delivery).
    reconnect_s: float = 10.0
    max_s: dict[str, float] = field(default_factory=dict)

    def as_body(self) -> dict:
        return asdict(self)

    @classmethod
    def from_body(cls, body: dict | None) -> TimingBudget:
        """A controller's stated budget; a controller that states none gets the defaults."""
        if not body:
            return cls()
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in body.items() if k in known}
        if "max_s" in values:
            values["max_s"] = {str(k): float(v) for k, v in dict(values["max_s"]).items()}
        return cls(**{k: (v if k == "max_s" else float(v)) for k, v in values.items()})

    def overridden(self, overrides: dict[str, float]) -> TimingBudget:
        """The budget with a rig's own figures (device URL or YAML) put over it."""
        plain = {k: float(v) for k, v in overrides.items() if k != "max_s"}
        return replace(self, **plain)

    def limit_for(self, operation: str) -> float | None:
        """The longest ``operation`` may take (None: only the silence rule applies)."""
        return self.max_s.get(operation)


TIMING_KEYS = tuple(f.name for f in fields(TimingBudget) if f.name != "max_s")
