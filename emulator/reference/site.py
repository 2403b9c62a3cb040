"""One process, two AEs: the reference TMS and the reference Archive it schedules from.

This is what ``tdw-emu tms`` runs, what the demo embeds and what tests start: the TMS reads
plans and treatment records from the co-hosted Archive's store, each AE on its own port.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from emulator.conformance.suite import load_scenarios
from emulator.metrics import Metrics
from emulator.net.ae_factory import NetworkSettings
from emulator.net.peers import Peer
from emulator.reference.archive import ArchiveConfig, ArchiveServer
from emulator.reference.feeder import FeedPlan, SessionFeeder
from emulator.reference.tms import TmsConfig, TmsServer
from emulator.reference.tms_faults import TmsFaults
from emulator.seeding import AFTERLOADER_PATIENTS, SeedOptions, synthetic_patient
from emulator.store.importer import dicom_files, import_files


@dataclass
class SiteConfig:
    data_dir: Path
    tms_ae_title: str = "TMS"
    archive_ae_title: str = "ARCHIVE"
    host: str = "127.0.0.1"
    tms_port: int = 11114
    archive_port: int = 11112
    peers: list[Peer] = field(default_factory=list)
    allowed_callers: list[str] = field(default_factory=list)
    accept_any_ae: bool = False
    edition: str = "ihe-ro-2008"
    uid_set: str = "final"
    seed_options: SeedOptions = field(default_factory=SeedOptions)
    brachy_options: SeedOptions = AFTERLOADER_PATIENTS  # what an afterloader station gets
    network: NetworkSettings = field(default_factory=NetworkSettings)
    faults: TmsFaults = field(default_factory=TmsFaults)  # injected, for testing devices
    max_request_bytes: int = 1 << 20  # TmsConfig.max_request_bytes
    feed: FeedPlan | None = None  # keep these stations supplied as they query (a soak)


# What a site keeps under its data directory: the Archive's and the TMS's stores, and the
# synthetic patients it seeded. Nothing else there is touched by forget_site().
SITE_PARTS = ("archive", "tms", "seed")


def forget_site(data_dir: Path) -> list[Path]:
    """Removes what a previous site left under ``data_dir`` (objects, UPS, seeded patients),
    so a re-seeded TMS starts with sessions nobody used: a conformance re-run needs them."""
    import shutil

    removed = []
    for part in SITE_PARTS:
        path = Path(data_dir) / part
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(path)
    return removed


class ReferenceSite:
    """The TMS and the Archive, started and stopped together."""

    def __init__(self, config: SiteConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        root = Path(config.data_dir)
        self.archive = ArchiveServer(
            ArchiveConfig(
                data_dir=root / "archive",
                ae_title=config.archive_ae_title,
                host=config.host,
                port=config.archive_port,
                peers=config.peers,
                allowed_callers=config.allowed_callers,
                accept_any_ae=config.accept_any_ae,
                uid_set=config.uid_set,
                network=config.network,
            ),
            metrics,
        )
        self.tms = TmsServer(
            TmsConfig(
                data_dir=root / "tms",
                ae_title=config.tms_ae_title,
                host=config.host,
                port=config.tms_port,
                peers=config.peers,
                allowed_callers=config.allowed_callers,
                accept_any_ae=config.accept_any_ae,
                edition=config.edition,
                uid_set=config.uid_set,
                network=config.network,
                faults=config.faults,
                max_request_bytes=config.max_request_bytes,
            ),
            self.archive.store,
            config.archive_ae_title,
            metrics=metrics,
        )
        self.feeder: SessionFeeder | None = None

    def feed(self, plan: FeedPlan) -> SessionFeeder:
        """Keeps the stations ``plan`` matches supplied with sessions as they query."""
        self.feeder = SessionFeeder(plan, self.tms.ups, self.tms.scheduler, self.seed_course)
        for station in plan.prime:
            self.feeder.ensure(station)
        self.tms.on_worklist_query = self.feeder.asked
        return self.feeder

    def seed_course(self, station: str, index: int) -> tuple[str, int]:
        """Seeds patient ``index`` with fraction 1 at ``station`` (an HDR patient at a soak's
        afterloader station): (plan UID, fractions)."""
        from emulator.soak.fleet import station_kind

        session = self.tms.ups.session(self.seed(station, index, kind=station_kind(station)))
        plan = self.archive.store.get(session.plan_uid)
        planned = self.archive.store.read(plan, stop_before_pixels=True)
        return session.plan_uid, int(planned.FractionGroupSequence[0].NumberOfFractionsPlanned)

    def start(self) -> dict[str, tuple[str, int]]:
        archive = self.archive.start()
        if self.config.feed is not None and self.feeder is None:
            self.feed(self.config.feed)
        tms = self.tms.start()
        return {self.config.archive_ae_title: archive, self.config.tms_ae_title: tms}

    def stop(self) -> None:
        if self.feeder is not None:
            self.feeder.stop()
            self.feeder.join(timeout=30)
        self.tms.stop()
        self.archive.stop()

    def __enter__(self) -> ReferenceSite:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def seed_scenarios(self, first_index: int = 1) -> list[tuple[str, str]]:
        """Schedules what ``profiles/scenarios.yaml`` needs: sessions per scenario station.

        For a scenario whose inputs must be missing, the RT Plan is withdrawn from the
        Archive's index after scheduling (the file is kept), as if it had been deleted.
        """
        seeded, index = [], first_index
        for scenario in load_scenarios(edition=self.config.edition):
            for _ in range(scenario.sessions):
                session_id = self.seed(scenario.station, index, kind=scenario.kind)
                if scenario.inputs_missing:
                    plan_uid = self.tms.ups.session(session_id).plan_uid
                    self.archive.store.withdraw(plan_uid)
                seeded.append((scenario.station, session_id))
                index += 1
        return seeded

    def import_into_archive(self, root: Path) -> int:
        """Stores the DICOM files under ``root`` (``tdw-emu seed``'s output) in the Archive;
        returns how many it holds from them. A file it refuses stops the import, named."""
        paths = dicom_files(root)
        if not paths:
            raise ValueError(f"no DICOM files (*.dcm) under {root}")
        for path, outcome in import_files(self.archive.store, paths).items():
            if isinstance(outcome, Exception):
                raise ValueError(f"the Archive refused {path}: {outcome}")
        return len(paths)

    def check_plan_kind(self, plan_uid: str, kind: str) -> None:
        """``tms schedule --kind``: the plan must be one that kind of machine treats."""
        from emulator.synth.brachy_access import is_brachy_plan

        instance = self.archive.store.get(plan_uid)
        if instance is None:
            raise ValueError(f"the Archive holds no RT Plan {plan_uid}")
        plan = self.archive.store.read(instance, stop_before_pixels=True)
        brachy = is_brachy_plan(plan)
        if brachy != (kind == "afterloader"):
            has = "brachy application setups" if brachy else "external beams"
            raise ValueError(f"plan {plan_uid} has {has}: it is not for a {kind}")

    def archive_plan_uid(self, patient_id: str | None = None) -> str:
        """The RT Plan to schedule when none is named: ``patient_id``'s, or the Archive's
        only one. Several (or none) is an error that lists them."""
        plans = self.archive.store.select("modality = 'RTPLAN'")
        if patient_id:
            plans = [p for p in plans if p.values["patient_id"] == patient_id]
        if len(plans) == 1:
            return plans[0].sop_instance_uid
        whose = f" of patient {patient_id}" if patient_id else ""
        if not plans:
            raise ValueError(
                f"the Archive under {self.config.data_dir} holds no RT Plan{whose}: store one "
                "(tdw-emu tms --import DIR, or --seed STATION) or name it with --plan-uid"
            )
        listed = "; ".join(
            f"{p.sop_instance_uid} (patient {p.values['patient_id']})" for p in plans[:10]
        )
        raise ValueError(
            f"the Archive holds {len(plans)} RT Plans{whose}; name one with --plan-uid or "
            f"--patient-id: {listed}"
        )

    def seed(
        self, station: str, index: int, start: dt.datetime | None = None, kind: str = "linac"
    ) -> str:
        """Stores one synthetic patient in the Archive and schedules one session for it:
        for a linac station (4 UPS) or an afterloader (one brachytherapy delivery UPS)."""
        options = self.config.brachy_options if kind == "afterloader" else self.config.seed_options
        patient = synthetic_patient(options, index, self.tms.profile.sop_classes)
        out = Path(self.config.data_dir) / "seed" / f"patient_{index:03d}"
        paths = patient.write(out)
        planning = [p for p in paths if p.name != "RTBDI.dcm"]
        refused = {
            p: r
            for p, r in import_files(self.archive.store, planning).items()
            if isinstance(r, Exception)
        }
        if refused:
            raise RuntimeError(f"seeded objects refused by the Archive: {refused}")
        start = start or dt.datetime.now().replace(second=0, microsecond=0)
        return self.tms.scheduler.schedule_session(
            patient.plan.SOPInstanceUID, station, start, fraction=1
        )
