"""Device backends by name, plus the ``tdw_emulator.devices`` entry-point group.

As in python-can, a URL-like spec picks the backend: ``sim`` or ``sim:linac``,
``serial:///dev/pts/3``, ``tcp://127.0.0.1:9000``. Third-party drivers register a factory
under the entry-point group and are found by the same name.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from devices.base import Device
from devices.clock import Clock

ENTRY_POINT_GROUP = "tdw_emulator.devices"
Factory = Callable[[str, Clock, dict], Device]
_BACKENDS: dict[str, Factory] = {}


def register(name: str, factory: Factory) -> None:
    _BACKENDS[name] = factory


def _builtin() -> None:
    from devices.remote import protocol_device
    from devices.sim.linac import make_simulated_device

    _BACKENDS.setdefault("sim", make_simulated_device)
    for scheme in ("serial", "tcp", "rfc2217", "socket"):
        _BACKENDS.setdefault(scheme, protocol_device(scheme))


def backends() -> list[str]:
    _builtin()
    names = set(_BACKENDS)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def open_device(spec: str, clock: Clock, options: dict | None = None) -> Device:
    """``sim``, ``sim:couch`` or ``name:rest``; ``rest`` is handed to the backend."""
    _builtin()
    name, _, rest = spec.partition(":")
    factory = _BACKENDS.get(name)
    if factory is None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                factory = ep.load()
                break
    if factory is None:
        raise ValueError(f"unknown device backend {name!r}; known: {', '.join(backends())}")
    return factory(rest.lstrip("/") if name == "sim" else rest, clock, options or {})
