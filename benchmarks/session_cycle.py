"""Times a full PDS session at time scale 0 against raw pynetdicom doing the same DIMSE.

Both run in this process against the same reference TMS and Archive on loopback: the
emulated PDS (4 UPS, 5 beams, 16-slice CT, with input checks, results building, local
spooling, and one TMS association per burst of exchanges) and a minimal script of raw pynetdicom
calls that sends the same C-FIND, C-MOVE, N-ACTION, N-SET and C-STORE messages with
objects prepared in advance. It prints both median times and their ratio.

    python benchmarks/session_cycle.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelMove,
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
)

from emulator.net.ae_factory import NODELAY_HANDLER
from emulator.net.peers import Peer
from emulator.net.ports import free_port
from emulator.performer.workflow import DeviceConfig, PerformingDevice
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SeedOptions
from emulator.ups_references import references_in

OPTIONS = SeedOptions(slices=16, beams=5, dynamic_beams=2, control_points=20)


def device_session(site: ReferenceSite, port: int, root: Path) -> tuple[float, list[Dataset]]:
    config = DeviceConfig(
        "pds",
        "LINAC1",
        "PDS1",
        Peer("TMS", *site.tms.address),
        Peer("ARCHIVE", *site.archive.address),
        root,
        listen_port=port,
    )
    with PerformingDevice(config) as device:
        started = time.perf_counter()
        outcomes = device.run_once()
        elapsed = time.perf_counter() - started
        assert [o.state for o in outcomes] == ["COMPLETED"] * 4, outcomes
        produced = [
            device.receiver.store.read(device.receiver.store.get(uid))
            for o in outcomes
            for uid in o.stored
        ]
    return elapsed, produced


def raw_session(
    site: ReferenceSite, port: int, results: list[Dataset], nodelay: bool
) -> tuple[float, int]:
    """The same DIMSE exchanges with bare pynetdicom calls; returns (seconds, messages)."""
    handlers = [NODELAY_HANDLER] if nodelay else []
    received: list[Dataset] = []
    receiver = AE(ae_title="RAW1")
    for uid in site.archive.storage_uids:
        receiver.add_supported_context(uid)
    server = receiver.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[
            *handlers,
            (evt.EVT_C_STORE, lambda event: (received.append(event.dataset), 0x0000)[1]),
        ],
    )
    messages = 0
    try:
        started = time.perf_counter()
        ae = AE(ae_title="RAW1")
        ae.requested_contexts = [
            build_context(UnifiedProcedureStepPull),
            build_context(StudyRootQueryRetrieveInformationModelMove),
        ]
        tms = ae.associate(*site.tms.address, ae_title="TMS", evt_handlers=handlers)
        ident = Dataset()
        ident.ProcedureStepState = "SCHEDULED"
        ident.InputInformationSequence = Sequence([])
        ident.ScheduledWorkitemCodeSequence = Sequence([])
        ident.SOPInstanceUID = ""
        worklist = [
            u for s, u in tms.send_c_find(ident, UnifiedProcedureStepPull) if s.Status == 0xFF00
        ]
        messages += 1
        store_ae = AE(ae_title="RAW1")
        classes = sorted({str(d.SOPClassUID) for d in results})
        store_ae.requested_contexts = [
            build_context(StudyRootQueryRetrieveInformationModelMove),
            *(build_context(uid) for uid in classes),
        ]
        archive = store_ae.associate(
            *site.archive.address, ae_title="ARCHIVE", evt_handlers=handlers
        )
        for ups in sorted(worklist, key=lambda u: u.ScheduledWorkitemCodeSequence[0].CodeValue):
            uid = ups.SOPInstanceUID
            by_ae: dict[str, list[str]] = {}
            for ref in references_in(ups.InputInformationSequence):
                by_ae.setdefault(ref.retrieve_ae_title, []).append(ref.sop_instance_uid)
            for ae_title, uids in by_ae.items():  # one C-MOVE per AE, as the device does
                move = Dataset()
                move.QueryRetrieveLevel = "IMAGE"
                move.SOPInstanceUID = uids
                peer = tms if ae_title == "TMS" else archive
                list(peer.send_c_move(move, "RAW1", StudyRootQueryRetrieveInformationModelMove))
                messages += 1
            transaction = str(generate_uid())
            claim = Dataset()
            claim.ProcedureStepState = "IN PROGRESS"
            claim.TransactionUID = transaction
            tms.send_n_action(claim, 1, UnifiedProcedureStepPush, uid)
            code = ups.ScheduledWorkitemCodeSequence[0].CodeValue
            sets = 7 if code == "121726" else 2  # progress per beam, final progress
            for percent in range(sets):
                update = Dataset()
                update.TransactionUID = transaction
                item = Dataset()
                item.ProcedureStepProgress = percent * 10
                update.ProcedureStepProgressInformationSequence = Sequence([item])
                tms.send_n_set(update, UnifiedProcedureStepPush, uid)
            mine = {
                "121707": [d for d in results if d.Modality == "CT"],
                "121714": [d for d in results if d.Modality == "REG"],
                "121726": [d for d in results if d.Modality == "RTRECORD"],
            }.get(code, [])
            for ds in mine:
                archive.send_c_store(ds)
            performed = Dataset()
            performed.PerformedStationNameCodeSequence = Sequence(
                [ups.ScheduledWorkitemCodeSequence[0]]
            )
            performed.PerformedProcedureStepStartDateTime = dt.datetime.now().strftime(
                "%Y%m%d%H%M%S"
            )
            performed.PerformedProcedureStepEndDateTime = (
                performed.PerformedProcedureStepStartDateTime
            )
            performed.PerformedWorkitemCodeSequence = ups.ScheduledWorkitemCodeSequence
            performed.OutputInformationSequence = Sequence([])
            performed.NonDICOMOutputCodeSequence = Sequence([])
            final = Dataset()
            final.TransactionUID = transaction
            final.UnifiedProcedureStepPerformedProcedureSequence = Sequence([performed])
            tms.send_n_set(final, UnifiedProcedureStepPush, uid)
            done = Dataset()
            done.ProcedureStepState = "COMPLETED"
            done.TransactionUID = transaction
            status, _ = tms.send_n_action(done, 1, UnifiedProcedureStepPush, uid)
            assert status.Status == 0, f"raw COMPLETED refused 0x{status.Status:04X}"
            messages += 1 + sets + 1 + len(mine) + 1  # claim, N-SETs, final, stores, done
        archive.release()
        tms.release()
        return time.perf_counter() - started, messages
    finally:
        server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        device_port, raw_port = free_port(), free_port()
        config = SiteConfig(
            data_dir=root / "site",
            tms_port=0,
            archive_port=0,
            peers=[Peer("PDS1", "127.0.0.1", device_port), Peer("RAW1", "127.0.0.1", raw_port)],
            seed_options=OPTIONS,
        )
        with ReferenceSite(config) as site:
            site.seed("LINAC1", 1)
            plan_uid = site.archive.store.select("modality = 'RTPLAN'")[0].sop_instance_uid
            device_times, raw_times, nodelay_times = [], [], []
            produced: list[Dataset] = []
            for run in range(args.repeat):
                if run:
                    site.tms.scheduler.schedule_session(plan_uid, "LINAC1", dt.datetime.now(), 1)
                seconds, produced = device_session(site, device_port, root / f"device{run}")
                device_times.append(seconds)
                site.tms.scheduler.schedule_session(plan_uid, "LINAC1", dt.datetime.now(), 1)
                seconds, messages = raw_session(site, raw_port, produced, nodelay=False)
                raw_times.append(seconds)
                site.tms.scheduler.schedule_session(plan_uid, "LINAC1", dt.datetime.now(), 1)
                seconds, messages = raw_session(site, raw_port, produced, nodelay=True)
                nodelay_times.append(seconds)
    device = statistics.median(device_times)
    print(
        f"PDS session, time scale 0, 4 UPS, {OPTIONS.beams} beams, {OPTIONS.slices}-slice CT, "
        f"{messages} DIMSE requests, median of {args.repeat}"
    )

    def line(label: str, times: list[float]) -> None:
        median = statistics.median(times)
        runs = ", ".join(f"{t * 1000:.0f}" for t in times)
        print(
            f"  {label:<34} {median * 1000:8.1f} ms  ratio tdw-emu/this "
            f"{device / median:5.2f}  (runs: {runs})"
        )

    line("tdw-emu PDS (TCP_NODELAY)", device_times)
    line("raw pynetdicom, default sockets", raw_times)
    line("raw pynetdicom, TCP_NODELAY", nodelay_times)


if __name__ == "__main__":
    main()
