"""RO-18 retrieval speed: a 200-slice 512x512 CT (about 100 MB) by C-MOVE into a device.

Sources, each timed from the C-MOVE request to its final response, with every object
admitted and durable (fsync) in the device's Storage SCP when it is acknowledged:
  - the reference Archive (tdw-emu archive, in this process);
  - Orthanc (Debian's, on loopback);
and, for the baseline in the same run, DCMTK alone: movescu asks dcmqrscp to send the
series to storescp, once with TCP_NODELAY=1 in the tools' environment and once without
(the Nagle/delayed-ACK stall of shared/spec-notes.md). Target: reference Archive <= 1.5 s.

    python benchmarks/retrieve.py [--slices 200] [--rows 512]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def time_move(source: Peer, study_uid: str, receiver_dir: Path, port: int) -> tuple[float, int]:
    uids = load_sop_classes("final")
    receiver = StorageReceiver(
        receiver_dir, "BENCHDEV", uids.archive_storage_uids(), [source.ae_title], port=port
    )
    receiver.start()
    try:
        started = time.perf_counter()
        scu.move("BENCHDEV", source, move_identifier(study_uid), "BENCHDEV")
        elapsed = time.perf_counter() - started
        return elapsed, receiver.store.count()
    finally:
        receiver.stop()


def reference_archive(root: Path, paths: list[Path], study_uid: str) -> tuple[float, int]:
    port = free_port()
    archive = ArchiveServer(
        ArchiveConfig(
            data_dir=root / "archive", port=0, peers=[Peer("BENCHDEV", "127.0.0.1", port)]
        )
    )
    refused = [r for r in import_files(archive.store, paths).values() if isinstance(r, Exception)]
    if refused:
        raise RuntimeError(f"the Archive refused the series: {refused[0]}")
    archive.start()
    try:
        return time_move(Peer("ARCHIVE", *archive.address), study_uid, root / "dev-ref", port)
    finally:
        archive.stop()


def orthanc(root: Path, paths: list[Path], study_uid: str) -> tuple[float, int] | None:
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(binary).exists():
        return None
    port, dicom, http = free_port(), free_port(), free_port()
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
                "DicomModalities": {"bench": ["BENCHDEV", "127.0.0.1", port]},
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
        return time_move(peer, study_uid, root / "dev-orthanc", port)
    finally:
        process.terminate()
        process.wait(timeout=30)


def dcmtk(root: Path, paths: list[Path], study_uid: str, nodelay: bool) -> float:
    """movescu -> dcmqrscp -> storescp, all DCMTK; TCP_NODELAY=1 in their env or not."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    tag = "nodelay" if nodelay else "default"
    storage, received = root / f"qr-{tag}", root / f"received-{tag}"
    storage.mkdir()
    received.mkdir()
    qr_port, store_port = free_port(), free_port()
    config = root / f"dcmqrscp-{tag}.cfg"
    config.write_text(
        f"NetworkTCPPort = {qr_port}\nMaxPDUSize = 131072\nMaxAssociations = 16\n"
        f"HostTable BEGIN\nstorescp = (STORESCP, 127.0.0.1, {store_port})\n"
        f"loader = (LOADER, 127.0.0.1, 1)\nHostTable END\n"
        f"VendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nQR {storage} RW (500, 2048mb) ANY\nAETable END\n"
    )
    qr = subprocess.Popen(
        ["/usr/bin/dcmqrscp", "-c", str(config), str(qr_port)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    sink = subprocess.Popen(
        ["/usr/bin/storescp", "--output-directory", str(received), str(store_port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(qr_port, 30)
        wait_for_port(store_port, 30)
        subprocess.run(
            ["/usr/bin/storescu", "-aet", "LOADER", "-aec", "QR", "127.0.0.1", str(qr_port),
             *map(str, paths)],
            env={**env, "TCP_NODELAY": "1"}, check=True, capture_output=True,
        )  # fmt: skip
        started = time.perf_counter()
        subprocess.run(
            ["/usr/bin/movescu", "-aet", "BENCH", "-aec", "QR", "-aem", "STORESCP", "-S",
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
             "127.0.0.1", str(qr_port)],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        count = len(list(received.iterdir()))
        if count != len(paths):
            raise RuntimeError(f"storescp received {count} of {len(paths)}")
        return elapsed
    finally:
        for process in (qr, sink):
            process.terminate()
            process.wait(timeout=30)


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
        ref_s, ref_n = reference_archive(root, paths, study_uid)
        print(f"reference Archive -> device SCP (C-MOVE, durable): {ref_s:.2f} s, {ref_n} objects")
        result = orthanc(root, paths, study_uid)
        if result:
            print(f"Orthanc           -> device SCP (C-MOVE, durable): {result[0]:.2f} s, "
                  f"{result[1]} objects")  # fmt: skip
        else:
            print("Orthanc: not installed")
        fast = dcmtk(root, paths, study_uid, nodelay=True)
        slow = dcmtk(root, paths, study_uid, nodelay=False)
        print(f"DCMTK movescu: dcmqrscp -> storescp, TCP_NODELAY=1: {fast:.2f} s")
        print(f"DCMTK movescu: dcmqrscp -> storescp, default:       {slow:.2f} s "
              f"({slow / len(paths) * 1000:.1f} ms per object)")  # fmt: skip
        print(f"ratio reference Archive / DCMTK with TCP_NODELAY: {ref_s / fast:.1f}")
        verdict = "meets" if ref_s <= TARGET_S else "misses"
        print(f"target <= {TARGET_S} s from the reference Archive: {verdict} ({ref_s:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
