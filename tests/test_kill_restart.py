"""kill -9 of ``tdw-emu run`` at random points, then the same command again, many times.

Afterwards no UPS may be left IN PROGRESS, every record the Archive holds must be named by
exactly one UPS's Output Information, no result may have been stored twice, and no step
may have been performed after an earlier step of its session was canceled (a kill stops a
session at the step it lands in; the restarted process must not carry on past it).

The site and the device run TDW-II: there the device makes each Transaction UID and
journals the claim before sending it, so a kill at any moment, even between the TMS
accepting a claim and the device hearing so, leaves nothing IN PROGRESS. Under RO-19 2008
the TMS makes the UID and a kill in that window leaves a UPS the device cannot end (it
says so: tests/test_performer.py); this test would then fail by the seed's design.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess

from emulator.performer.actors import STEP_ORDER
from emulator.reference.ups_store import UpsStore
from emulator.store import ObjectStore
from tests.conftest import REPO, free_port
from tests.kill_harness import (
    RESTARTED,
    cancel_reason,
    named_results,
    run_command,
    run_to_the_end,
    start_site,
    undecided_claims,
)

# Three kills at random moments (TDW_KILLS=N for more): make test fits 20 minutes on 2 cores.
KILLS = int(os.environ.get("TDW_KILLS", "3"))


def test_killed_and_restarted_device_leaves_nothing_in_progress(tmp_path):
    device_port = free_port()
    # More sessions than kills: each kill can stop at most one, the last run completes others.
    tms = start_site(tmp_path / "site", device_port, KILLS + 2, "--profile", "tdw-ii")
    try:
        run = run_command(
            tms, device_port, tmp_path / "device",
            "--time-scale", "0.05", "--sessions", "3", "--wait", "2", "--profile", "tdw-ii",
        )  # fmt: skip
        rng = random.Random(7)
        # Each kill that lands inside a claim leaves it undecided in the device's journal;
        # the next run must cancel exactly those (and complete or settle the decided ones).
        certain: set[str] = set()
        maybe: set[str] = set()
        kills = 0
        for _ in range(KILLS):
            process = subprocess.Popen(
                run, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                process.wait(timeout=rng.uniform(1.0, 6.0))
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)
                kills += 1
            held, in_flight = undecided_claims(tmp_path / "device")
            certain |= held
            maybe |= in_flight
        assert kills >= KILLS // 2, "most runs ended before their kill: nothing was tested"
        assert certain, "no kill landed inside a claim: nothing was tested"
        run_to_the_end(run, tmp_path / "device")
    finally:
        tms.stop()

    ups = UpsStore(tmp_path / "site" / "tms" / "ups.sqlite3")
    archive = ObjectStore(tmp_path / "site" / "archive")
    try:
        records = ups.select()
        states = [r.state for r in records]
        # The last run took everything: nothing a device could take is left SCHEDULED.
        assert "SCHEDULED" not in states, [(r.session_id[-6:], r.step, r.state) for r in records]
        reasons = [cancel_reason(r) for r in records]
        # Exactly the claims a kill left undecided were canceled by the restarted device (the
        # TMS's cancellation of the steps after one quotes it: "the session's ... ended
        # CANCELED: the device restarted while ...", and is not the device's).
        restarted = {
            r.sop_instance_uid
            for r, why in zip(records, reasons, strict=True)
            if why.startswith(RESTARTED)
        }
        # Every claim a kill left held was canceled on restart; a claim still on its way when
        # the kill came was canceled if the TMS had got it, and nothing else was.
        assert certain <= restarted <= certain | maybe, (restarted, certain, maybe)
        assert "IN PROGRESS" not in states, states
        assert states.count("COMPLETED") >= 4  # at least one whole session got through
        sessions: dict[str, dict[str, str]] = {}
        for r in records:
            sessions.setdefault(r.session_id, {})[r.step] = r.state
        for key, steps in sessions.items():
            ordered = [steps[step] for step in STEP_ORDER if step in steps]
            stop = next((i for i, st in enumerate(ordered) if st != "COMPLETED"), len(ordered))
            # The TMS ends the steps after a canceled one (docs/tms.md): none was performed.
            assert set(ordered[stop + 1 :]) <= {"CANCELED"}, (key, steps)
        named = named_results(records)
        assert len(named) == len(set(named)), "a result is named by two UPS"
        held = {i.sop_instance_uid for i in archive.select("modality = 'RTRECORD'")}
        named_records = {uid for uid in named if uid in held}
        # Every record the Archive holds belongs to exactly one UPS: none sent twice under
        # a new UID, none left behind by a UPS that was then ended without it.
        assert held == named_records, held ^ named_records
    finally:
        ups.close()
        archive.close()
