"""The workflow with a real archive: Orthanc and DCMTK's dcmqrscp instead of ours.

The reference TMS schedules the session with the archive's AE title in every Retrieve AE
Title; the synthetic patient is stored to that archive over DICOM. The PDS then retrieves
the CT and the plan from it by C-MOVE (RO-18), stores CBCT, registration and treatment
record to it (RO-22 to RO-24), and the tests read those back from the archive itself
(Orthanc's REST API, dcmqrscp's storage area) and validate them.
"""

from __future__ import annotations

import io
import json
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from emulator.net import scu
from emulator.net.peers import Peer
from emulator.performer.workflow import DeviceConfig, PerformingDevice
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SeedOptions
from tests.conftest import DCMTK_ENV, dciodvfy_errors, dcmtk, free_port, require_tool, wait_for_port

SMALL = SeedOptions(slices=6, rows=48, beams=3, dynamic_beams=1, control_points=8)


@dataclass
class RealArchive:
    ae_title: str
    port: int
    process: subprocess.Popen
    read_back: object  # () -> {sop_instance_uid: Dataset}


def _orthanc(tmp_path: Path, device_port: int) -> RealArchive:
    binary = require_tool("/usr/sbin/Orthanc")
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "tdw-test",
        "StorageDirectory": str(tmp_path / "orthanc-storage"),
        "IndexDirectory": str(tmp_path / "orthanc-index"),
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # HTTP on loopback only
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomModalities": {"pds1": ["PDS1", "127.0.0.1", device_port]},
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "StorageCompression": False,
        "Plugins": [],
    }
    path = tmp_path / "orthanc.json"
    path.write_text(json.dumps(config))
    process = subprocess.Popen(
        [binary, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(dicom_port, timeout=30)
    wait_for_port(http_port, timeout=30)
    base = f"http://127.0.0.1:{http_port}"

    def read_back() -> dict:
        ids = json.loads(urllib.request.urlopen(f"{base}/instances", timeout=10).read())
        found = {}
        for orthanc_id in ids:
            data = urllib.request.urlopen(f"{base}/instances/{orthanc_id}/file", timeout=10).read()
            ds = dcmread(io.BytesIO(data))
            found[str(ds.SOPInstanceUID)] = ds
        return found

    return RealArchive("ORTHANC", dicom_port, process, read_back)


def _dcmqrscp(tmp_path: Path, device_port: int) -> RealArchive:
    binary = dcmtk("dcmqrscp")
    port = free_port()
    storage = tmp_path / "dcmqrscp-storage"
    storage.mkdir()
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 65536\nMaxAssociations = 16\n"
        "HostTable BEGIN\n"
        f"pds1 = (PDS1, 127.0.0.1, {device_port})\n"
        "HostTable END\n"
        "VendorTable BEGIN\nVendorTable END\n"
        "AETable BEGIN\n"
        f"DCMQRSCP {storage} RW (200, 1024mb) ANY\n"
        "AETable END\n"
    )
    process = subprocess.Popen(
        # Forking per association, as deployed; --single-process serves one and stops.
        [binary, "-c", str(config), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=DCMTK_ENV,
    )
    wait_for_port(port, timeout=30)

    def read_back() -> dict:
        found = {}
        for path in storage.iterdir():
            if path.name.startswith("index.dat"):
                continue
            ds = dcmread(path)
            found[str(ds.SOPInstanceUID)] = ds
        return found

    return RealArchive("DCMQRSCP", port, process, read_back)


@pytest.fixture(params=["orthanc", "dcmqrscp"])
def real_archive(request, tmp_path):
    device_port = free_port()
    make = _orthanc if request.param == "orthanc" else _dcmqrscp
    archive = make(tmp_path, device_port)
    yield archive, device_port
    archive.process.terminate()
    try:
        archive.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        archive.process.kill()


def test_a_session_against_a_real_archive(real_archive, tmp_path):
    archive, device_port = real_archive
    site = ReferenceSite(
        SiteConfig(
            data_dir=tmp_path / "site",
            tms_port=0,
            archive_port=0,
            archive_ae_title=archive.ae_title,  # what the UPS references name
            seed_options=SMALL,
            peers=[Peer("PDS1", "127.0.0.1", device_port)],
        )
    )
    with site:
        site.seed("LINAC1", 1)
        planning = sorted(
            p
            for p in (tmp_path / "site" / "seed" / "patient_001").glob("*.dcm")
            if p.name != "RTBDI.dcm"
        )
        archive_peer = Peer(archive.ae_title, "127.0.0.1", archive.port)
        scu.store("LOADER", archive_peer, planning)
        device = PerformingDevice(
            DeviceConfig(
                "pds",
                "LINAC1",
                "PDS1",
                Peer("TMS", *site.tms.address),
                archive_peer,
                tmp_path / "device",
                listen_port=device_port,
            )
        )
        with device:
            outcomes = device.run_once()
            held = {i.sop_instance_uid for i in device.receiver.store.select()}
    assert [o.state for o in outcomes] == ["COMPLETED"] * 4, [o.reason for o in outcomes]
    # RO-18: the CT and the plan came from the real archive into the device's store.
    planned = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in planning}
    plan_and_ct = {
        str(ds.SOPInstanceUID)
        for p in planning
        if (ds := dcmread(p, stop_before_pixels=True)).Modality in ("CT", "RTPLAN")
    }
    assert plan_and_ct <= held
    # RO-22 to RO-24: everything the device stored is in the archive, and valid.
    stored = {uid for o in outcomes for uid in o.stored}
    found = archive.read_back()
    assert stored and stored <= set(found), stored - set(found)
    assert planned <= set(found)
    modalities = {str(found[uid].Modality) for uid in stored}
    assert modalities == {"CT", "REG", "RTRECORD"}
    record = next(found[uid] for uid in stored if found[uid].Modality == "RTRECORD")
    delivered = {int(b.ReferencedBeamNumber): float(b.DeliveredPrimaryMeterset)
                 for b in record.TreatmentSessionBeamSequence}  # fmt: skip
    assert delivered == outcomes[-1].delivered
    for uid in stored:
        if found[uid].Modality in ("REG", "RTRECORD"):
            out = tmp_path / f"{uid}.dcm"
            found[uid].save_as(out)
            assert dciodvfy_errors(out) == []
