"""The pynetdicom patches go in only on the pynetdicom they were verified on (patch_guard).

The fallback is exercised in a fresh interpreter, where emulator.net has not been imported
yet: one pretends a pynetdicom 3.1.0, the other rewrites one method a patch replaces. Both
must leave every patch out, say so in one warning line, and still run a real RO-17 worklist
query against the reference TMS on stock pynetdicom.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pynetdicom

from emulator.net import (
    PATCHED,
    dimse_queue_guard,
    patch_guard,
    reactor_wakeup,
    socket_ready_guard,
    trial_ups_contexts,
)

WORKLIST_ON_STOCK = """
import tempfile
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import emulator.net as net
from emulator.net import dimse_queue_guard, reactor_wakeup, socket_ready_guard
from emulator.net import trial_ups_contexts
from emulator.net.ups_scu import UpsConnection
from emulator.net.peers import Peer
from emulator.profile import load_profile
from tests.conftest import one_session_site

guards = (dimse_queue_guard, reactor_wakeup, socket_ready_guard, trial_ups_contexts)
print("patched", net.PATCHED, [g.installed() for g in guards])
with tempfile.TemporaryDirectory() as tmp:
    with one_session_site(Path(tmp), accept_any_ae=True) as site:
        query = Dataset()
        query.ProcedureStepState = "SCHEDULED"
        query.ScheduledStationNameCodeSequence = Sequence([])
        tms = Peer("TMS", *site.tms.address)
        with UpsConnection("PDS1", tms, load_profile()) as connection:
            found = connection.find(query)
        print("worklist", len(found))
"""


def _run_on(prelude: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(prelude) + WORKLIST_ON_STOCK
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )


def test_the_verified_pynetdicom_gets_every_patch():
    assert pynetdicom.__version__ in patch_guard.VERIFIED_VERSIONS
    assert patch_guard.refusal == ""
    assert PATCHED
    for guard in (dimse_queue_guard, reactor_wakeup, socket_ready_guard, trial_ups_contexts):
        assert guard.installed(), guard.__name__


def test_an_unverified_version_runs_stock_pynetdicom_and_says_so_once():
    result = _run_on("import pynetdicom\npynetdicom.__version__ = '3.1.0'\n")
    assert result.returncode == 0, result.stderr
    assert "patched False [False, False, False, False]" in result.stdout
    assert "worklist 4" in result.stdout, result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if "stock pynetdicom" in line]
    assert len(warnings) == 1, result.stderr
    assert "pynetdicom 3.1.0 is not a verified version (3.0.4)" in warnings[0]


def test_a_rewritten_method_is_seen_though_the_version_matches():
    prelude = """
    from pynetdicom.dimse import DIMSEServiceProvider

    original = DIMSEServiceProvider.get_msg

    def get_msg(self, block=False):  # the same behaviour, as a later release might write it
        return original(self, block)

    DIMSEServiceProvider.get_msg = get_msg
    """
    result = _run_on(prelude)
    assert result.returncode == 0, result.stderr
    assert "patched False [False, False, False, False]" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "stock pynetdicom" in line]
    assert len(warnings) == 1, result.stderr
    assert "differs from the verified source in DIMSEServiceProvider.get_msg" in warnings[0]
