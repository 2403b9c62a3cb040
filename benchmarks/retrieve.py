"""RO-18 retrieval speed: a 200-slice 512x512 CT (about 100 MB) by C-MOVE into a device.

Each row is timed from the C-MOVE request to its final response, and checks that the
destination holds every object. The device's Storage SCP admits each object and makes it
durable (fsync of file and directory, SQLite commit) before it acknowledges it.
  - reference Archive -> device SCP: the target, <= 1.5 s (both in this process);
  - reference Archive -> DCMTK storescp: the sender's share, against a native receiver;
  - DCMTK dcmqrscp -> device SCP: the receiver's share, from a native sender;
  - Orthanc (Debian's, on loopback) -> device SCP;
  - the DCMTK baseline in the same run: movescu asks dcmqrscp to send the series to
    storescp, once with TCP_NODELAY=1 in the tools' environment and once without (the
    Nagle/delayed-ACK stall of shared/spec-notes.md).

    python benchmarks/retrieve.py [--slices 200] [--rows 512]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom.dataset import Dataset

from emulator.net import scu
from emulator.net.peers import Peer
from emulator.net.ports import free_port, wait_for_port
from emulator.net.receiver import StorageReceiver
from emulator.profile import load_sop_classes
from emulator.reference.archive import ArchiveConfig, ArchiveServer
from emulator.store.importer import import_files
from emulator.synth import PatientContext, PhantomGeometry
from emulator.synth.ct import build_ct_series

TARGET_S = 1.5


class Sink(NamedTuple):
    """A Move Destination: its AE title, port, and how many objects it holds now."""

    ae_title: str
    port: int
    count: Callable[[], int]


def write_series(out: Path, slices: int, rows: int) -> tuple[list[Path], str]:
    uids = load_sop_classes("final")
    geometry = PhantomGeometry(rows=rows, columns=rows, pixel_spacing=500 / rows, slices=slices)
    series = build_ct_series(
        PatientContext(
            patient_name="TDW^Retrieve", patient_id="TDWR0001", accession_number="TDWR0001A"
        ),
        geometry,
        uids,
    )
    paths = []
    for index, ds in enumerate(series, start=1):
        path = out / f"CT{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, str(series[0].StudyInstanceUID)


def move_identifier(study_uid: str) -> Dataset:
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study_uid
    return ident


@contextlib.contextmanager
def device_scp(root: Path, caller: str) -> Iterator[Sink]:
    """The device's Storage SCP (durable admission), as a performing device runs it."""
    uids = load_sop_classes("final")
    port = free_port()
    receiver = StorageReceiver(
        root, "BENCHDEV", uids.archive_storage_uids(), [caller], port=port
    )  # fmt: skip
    receiver.start()
    try:
        yield Sink("BENCHDEV", port, receiver.store.count)
    finally:
        receiver.stop()


@contextlib.contextmanager
def dcmtk_storescp(root: Path, nodelay: bool = True) -> Iterator[Sink]:
    """DCMTK's storescp writing each object to a file (no fsync), the native baseline."""
    root.mkdir(parents=True)
    port = free_port()
    sink = subprocess.Popen(
        ["/usr/bin/storescp", "--output-directory", str(root), str(port)],
        env=_dcmtk_env(nodelay), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, 30)
        yield Sink("STORESCP", port, lambda: len(list(root.iterdir())))
    finally:
        sink.terminate()
        sink.wait(timeout=30)


def _dcmtk_env(nodelay: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def reference_archive(root: Path, paths: list[Path], study_uid: str, sink: Sink) -> float:
    """C-MOVE from the reference Archive (in this process) to ``sink``; seconds taken."""
    archive = ArchiveServer(
        ArchiveConfig(
            data_dir=root / "archive", port=0, peers=[Peer(sink.ae_title, "127.0.0.1", sink.port)]
        )
    )
    refused = [r for r in import_files(archive.store, paths).values() if isinstance(r, Exception)]
    if refused:
        raise RuntimeError(f"the Archive refused the series: {refused[0]}")
    archive.start()
    try:
        started = time.perf_counter()
        scu.move(
            sink.ae_title,
            Peer("ARCHIVE", *archive.address),
            move_identifier(study_uid),
            sink.ae_title,
        )
        return _received(started, sink, len(paths))
    finally:
        archive.stop()


def _received(started: float, sink: Sink, expected: int) -> float:
    elapsed = time.perf_counter() - started
    if sink.count() != expected:
        raise RuntimeError(f"{sink.ae_title} holds {sink.count()} of {expected} objects")
    return elapsed


def orthanc(root: Path, paths: list[Path], study_uid: str, sink: Sink) -> float | None:
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(binary).exists():
        return None
    dicom, http = free_port(), free_port()
    root.mkdir(parents=True)
    config = root / "orthanc.json"
    config.write_text(
        json.dumps(
            {
                "StorageDirectory": str(root / "orthanc"),
                "IndexDirectory": str(root / "orthanc"),
                "HttpPort": http,
                "RemoteAccessAllowed": False,
                "DicomAet": "ORTHANC",
                "DicomPort": dicom,
                "DicomModalities": {"bench": [sink.ae_title, "127.0.0.1", sink.port]},
                "DicomAlwaysAllowStore": True,
                "StorageCompression": False,
                "Plugins": [],
            }
        )
    )
    process = subprocess.Popen([binary, str(config)], stderr=subprocess.DEVNULL)
    try:
        wait_for_port(dicom, 30)
        peer = Peer("ORTHANC", "127.0.0.1", dicom)
        scu.store("LOADER", peer, paths)
        started = time.perf_counter()
        scu.move(sink.ae_title, peer, move_identifier(study_uid), sink.ae_title)
        return _received(started, sink, len(paths))
    finally:
        process.terminate()
        process.wait(timeout=30)


def dcmtk_qr(root: Path, paths: list[Path], study_uid: str, sink: Sink, nodelay: bool) -> float:
    """movescu asks dcmqrscp to send the series to ``sink``; TCP_NODELAY=1 in their env or not."""
    env = _dcmtk_env(nodelay)
    storage = root / "qr"
    storage.mkdir(parents=True)
    qr_port = free_port()
    config = root / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {qr_port}\nMaxPDUSize = 131072\nMaxAssociations = 16\n"
        f"HostTable BEGIN\nsink = ({sink.ae_title}, 127.0.0.1, {sink.port})\n"
        f"loader = (LOADER, 127.0.0.1, 1)\nHostTable END\n"
        f"VendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nQR {storage} RW (500, 2048mb) ANY\nAETable END\n"
    )
    qr = subprocess.Popen(
        ["/usr/bin/dcmqrscp", "-c", str(config), str(qr_port)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(qr_port, 30)
        subprocess.run(
            ["/usr/bin/storescu", "-aet", "LOADER", "-aec", "QR", "127.0.0.1", str(qr_port),
             *map(str, paths)],
            env=_dcmtk_env(True), check=True, capture_output=True,
        )  # fmt: skip
        started = time.perf_counter()
        subprocess.run(
            ["/usr/bin/movescu", "-aet", "BENCH", "-aec", "QR", "-aem", sink.ae_title, "-S",
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
             "127.0.0.1", str(qr_port)],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        return _received(started, sink, len(paths))
    finally:
        qr.terminate()
        qr.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--rows", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tdw-retrieve-") as tmp:
        root = Path(tmp)
        (root / "series").mkdir()
        paths, study_uid = write_series(root / "series", args.slices, args.rows)
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"CT series: {len(paths)} objects, {size_mb:.1f} MB")
        rows: list[tuple[str, float]] = []

        def report(label: str, seconds: float) -> None:
            rows.append((label, seconds))
            print(f"{label:<52} {seconds:6.2f} s  ({seconds / len(paths) * 1000:5.1f} ms/object)")

        with device_scp(root / "dev-ref", "ARCHIVE") as sink:
            ref_s = reference_archive(root / "ref", paths, study_uid, sink)
        report("reference Archive -> device SCP (the target)", ref_s)
        with dcmtk_storescp(root / "ref-storescp") as sink:
            report("reference Archive -> DCMTK storescp", reference_archive(
                root / "ref2", paths, study_uid, sink))  # fmt: skip
        with device_scp(root / "dev-qr", "QR") as sink:
            report("DCMTK dcmqrscp -> device SCP", dcmtk_qr(
                root / "qr-dev", paths, study_uid, sink, nodelay=True))  # fmt: skip
        with device_scp(root / "dev-orthanc", "ORTHANC") as sink:
            result = orthanc(root / "orthanc", paths, study_uid, sink)
        if result is None:
            print("Orthanc: not installed")
        else:
            report("Orthanc -> device SCP", result)
        with dcmtk_storescp(root / "nodelay-sink") as sink:
            fast = dcmtk_qr(root / "qr-nodelay", paths, study_uid, sink, nodelay=True)
        report("DCMTK dcmqrscp -> storescp, TCP_NODELAY=1", fast)
        with dcmtk_storescp(root / "default-sink", nodelay=False) as sink:
            slow = dcmtk_qr(root / "qr-default", paths, study_uid, sink, nodelay=False)
        report("DCMTK dcmqrscp -> storescp, default (Nagle)", slow)
        print(f"ratio reference Archive -> device / DCMTK with TCP_NODELAY: {ref_s / fast:.1f}")
        verdict = "meets" if ref_s <= TARGET_S else "misses"
        print(f"target <= {TARGET_S} s from the reference Archive: {verdict} ({ref_s:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
