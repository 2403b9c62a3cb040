"""Installs the pynetdicom patches only onto the pynetdicom they were verified on.

Four modules in this package replace pynetdicom internals (the reactor wake-up, poll()
readiness, the DIMSE queue guard, the trial UPS contexts). Each was measured against
pynetdicom 3.0.4 and depends on how that version's code is written: a loop whose
``time.sleep`` it intercepts, a method it wraps. A later pynetdicom that rewrote any of
them would leave a patch wrapping code that no longer exists, silently. So before any patch
is installed, this guard checks two things:

- the installed version is one of ``VERIFIED_VERSIONS`` (pyproject.toml pins the same);
- every piece of pynetdicom a patch replaces or depends on still has the source it had
  when verified (a SHA-256 of ``inspect.getsource``, in ``FINGERPRINTS``).

On anything else no patch is installed: stock pynetdicom runs (slower when idle, with the
rare queue race its own issues #435 and #875 describe), and one warning line says why.
The fingerprints are regenerated with
``TDW_STOCK_PYNETDICOM=1 python -m emulator.net.patch_guard`` after verifying a new version
(the variable keeps the patches out, so the sources read are pynetdicom's own).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from collections.abc import Callable

import pynetdicom
from pynetdicom import association, dimse, dul, transport

LOG = logging.getLogger("tdw.net")
VERIFIED_VERSIONS = frozenset({"3.0.4"})


def _targets() -> dict[str, object]:
    """What the patches replace or whose code they rely on, by a stable name."""
    return {
        "Association.__init__": association.Association.__init__,
        "Association.kill": association.Association.kill,
        "Association._run_reactor": association.Association._run_reactor,
        "Association._get_valid_context": association.Association._get_valid_context,
        "DIMSEServiceProvider.__init__": dimse.DIMSEServiceProvider.__init__,
        "DIMSEServiceProvider.get_msg": dimse.DIMSEServiceProvider.get_msg,
        "DULServiceProvider.__init__": dul.DULServiceProvider.__init__,
        "DULServiceProvider.run_reactor": dul.DULServiceProvider.run_reactor,
        "DULServiceProvider.kill_dul": dul.DULServiceProvider.kill_dul,
        "DULServiceProvider.stop_dul": dul.DULServiceProvider.stop_dul,
        "AssociationSocket.ready": transport.AssociationSocket.ready.fget,
    }


# SHA-256 of each target's source in pynetdicom 3.0.4 (see the module docstring).
FINGERPRINTS = {
    "Association.__init__": "eb07516b8009ad8f",
    "Association.kill": "8f9713666a7f4cff",
    "Association._run_reactor": "f28838c5559e462a",
    "Association._get_valid_context": "117a52c2ae6720e0",
    "DIMSEServiceProvider.__init__": "bbecd186810e7700",
    "DIMSEServiceProvider.get_msg": "890e3e04283f5aeb",
    "DULServiceProvider.__init__": "c82dafa9438ddf70",
    "DULServiceProvider.run_reactor": "e3a10eb3a0931e48",
    "DULServiceProvider.kill_dul": "5ceccf8dd01c2072",
    "DULServiceProvider.stop_dul": "28a7e0be126e7b30",
    "AssociationSocket.ready": "3eb58e3d39dc076d",
}


def fingerprint(target: object) -> str:
    """The SHA-256 of a function's source, first 16 hex digits; "" when it cannot be read."""
    try:
        source = inspect.getsource(target)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""
    return hashlib.sha256(source.encode()).hexdigest()[:16]  # enough to see a change


def unverified(version: str | None = None) -> str:
    """Why the installed pynetdicom is not the one the patches were verified on ("" if it is).

    Meaningful before the patches go in: afterwards the targets are the replacements.
    """
    version = pynetdicom.__version__ if version is None else version
    if version not in VERIFIED_VERSIONS:
        return f"pynetdicom {version} is not a verified version ({', '.join(VERIFIED_VERSIONS)})"
    changed = [
        name for name, target in _targets().items() if fingerprint(target) != FINGERPRINTS.get(name)
    ]
    if changed:
        return f"pynetdicom {version} differs from the verified source in {', '.join(changed)}"
    return ""


STOCK_VARIABLE = "TDW_STOCK_PYNETDICOM"  # "1": install nothing (to compare, or to rule out)
refusal = ""  # why install_all() left stock pynetdicom in place, "" when it did not


def install_all(installers: list[Callable[[], None]]) -> bool:
    """Runs every installer when pynetdicom is verified; else none, with one warning."""
    global refusal
    if os.environ.get(STOCK_VARIABLE) == "1":
        refusal = f"{STOCK_VARIABLE}=1"
        LOG.info("%s: stock pynetdicom runs without tdw-emulator's patches", refusal)
        return False
    reason = refusal = unverified()
    if reason:
        LOG.warning(
            "%s: stock pynetdicom runs without tdw-emulator's patches (reactor wake-up, "
            "poll readiness, DIMSE queue guard, trial UPS contexts)",
            reason,
        )
        return False
    for install in installers:
        install()
    return True


if __name__ == "__main__":  # prints FINGERPRINTS for the installed pynetdicom
    print(f"# pynetdicom {pynetdicom.__version__}")
    for name, target in _targets().items():
        print(f'    "{name}": "{fingerprint(target)}",')
