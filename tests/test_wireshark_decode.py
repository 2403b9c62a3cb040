"""Wireshark's DICOM dissector, independent of pynetdicom, decodes a whole session.

The demo's session (a PDS through four UPS, an interlock, the CONTINUATION) runs on fixed
free ports while tshark captures the loopback interface, filtered to those ports. Every
PDU must then decode as DICOM with no malformed-packet or error-level expert report.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter

from emulator.net.peers import Peer
from emulator.performer.workflow import DeviceConfig, PerformingDevice
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SeedOptions
from tests.conftest import free_port, require_tool

SMALL = SeedOptions(slices=6, rows=48, beams=3, dynamic_beams=1, control_points=8)
ERROR_SEVERITY = 0x00800000  # Wireshark's PI_ERROR


def test_every_pdu_of_a_session_decodes_in_wireshark(tmp_path):
    tshark = require_tool("/usr/bin/tshark")
    tms_port, archive_port, device_port = free_port(), free_port(), free_port()
    ports = (tms_port, archive_port, device_port)
    capture = tmp_path / "session.pcapng"
    sniffer = subprocess.Popen(
        [
            tshark,
            "-i",
            "lo",
            "-f",
            " or ".join(f"tcp port {p}" for p in ports),
            "-w",
            str(capture),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while "Capturing on" not in (line := sniffer.stderr.readline()):
            assert line and time.monotonic() < deadline, "tshark did not start capturing"
        site = ReferenceSite(
            SiteConfig(
                data_dir=tmp_path / "site",
                tms_port=tms_port,
                archive_port=archive_port,
                seed_options=SMALL,
                peers=[Peer("PDS1", "127.0.0.1", device_port)],
            )
        )
        with site:
            device = PerformingDevice(
                DeviceConfig(
                    "pds",
                    "LINAC1",
                    "PDS1",
                    Peer("TMS", "127.0.0.1", tms_port),
                    Peer("ARCHIVE", "127.0.0.1", archive_port),
                    tmp_path / "device",
                    listen_port=device_port,
                    interlocks={2: 40.0},
                )
            )
            with device:
                site.seed("LINAC1", 1)
                first = device.run_once()
                second = device.run_once()
        assert first[-1].state == "CANCELED" and [o.state for o in second] == ["COMPLETED"] * 4
        time.sleep(1.0)  # let the last FIN reach the capture
    finally:
        sniffer.send_signal(signal.SIGINT)
        sniffer.wait(timeout=30)

    decode_as = [arg for p in ports for arg in ("-d", f"tcp.port=={p},dicom")]
    fields = subprocess.run(
        [
            tshark,
            "-r",
            str(capture),
            *decode_as,
            "-Y",
            "dicom",
            "-T",
            "fields",
            "-e",
            "dicom.pdu.type",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    pdu_types = Counter(
        int(t, 0) for line in fields.stdout.split() for t in line.split(",") if t.strip()
    )
    # A-ASSOCIATE-RQ/AC, P-DATA-TF, A-RELEASE-RQ/RP all seen, P-DATA by the hundred.
    assert {1, 2, 4, 5, 6} <= set(pdu_types), pdu_types
    assert pdu_types[4] > 100, pdu_types
    bad = subprocess.run(
        [
            tshark,
            "-r",
            str(capture),
            *decode_as,
            "-Y",
            f"_ws.malformed or _ws.expert.severity >= {ERROR_SEVERITY}",
            "-T",
            "fields",
            "-e",
            "frame.number",
            "-e",
            "_ws.expert.message",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert bad.stdout.strip() == "", bad.stdout[:2000]
