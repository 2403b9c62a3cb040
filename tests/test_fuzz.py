"""Fuzzing (hypothesis): the Storage SCP, C-FIND identifiers, N-ACTION/N-SET replies, and the
wire-protocol decoder. Each target runs TDW_FUZZ_EXAMPLES inputs (3,000 in make test, which
must stay within 20 minutes on 2 cores; TDW_FUZZ_EXAMPLES=100000 for a long hunt) with no
crash and no hang: bad input gets a status or a typed error, never an exception escaping.
"""

from __future__ import annotations

import io
import os
import threading

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode as encode_dataset
from pynetdicom.sop_class import CTImageStorage, Verification

from devices.protocol import Frame, FrameError, FrameReader, MessageType, encode
from emulator.net.ae_factory import NetworkSettings, make_ae, start_server
from emulator.net.peers import Peer
from emulator.net.scu import DimseError
from emulator.net.ups_scu import UpsConnection
from emulator.profile import load_profile
from emulator.reference.archive import ArchiveConfig, ArchiveServer
from emulator.reference.qr_query import QueryError, StudyRootQuery
from emulator.reference.tms import TmsConfig, TmsServer
from emulator.seeding import SeedOptions, synthetic_patient
from emulator.store import AdmissionError, admit
from tests.conftest import one_session_site

# Garbage makes pydicom warn on nearly every input; the assertions are what count here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
EXAMPLES = int(os.environ.get("TDW_FUZZ_EXAMPLES", "3000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
VRS = ["AE", "AS", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "PN", "SH",
       "SL", "SQ", "SS", "ST", "TM", "UI", "UL", "UN", "US", "UT"]  # fmt: skip


@pytest.fixture(scope="module")
def ct_slice() -> Dataset:
    profile = load_profile("ihe-ro-2008", "final")
    patient = synthetic_patient(SeedOptions(slices=3, rows=16), 1, profile.sop_classes)
    return patient.ct[0]


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# -- the wire-protocol decoder ---------------------------------------------------------------

VALID = encode(Frame(MessageType.METERSET, 7, {"meterset": 41.5, "dose_rate": 600.0}))


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=400),
        st.tuples(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=8)).map(
            lambda cut: VALID[: cut[0]] + cut[1] + VALID[cut[0] :]
        ),
    ),
    st.integers(1, 64),
)
def test_wire_decoder_survives_anything_and_resynchronises(garbage, chunk):
    reader = FrameReader()
    items = []
    stream = garbage + b"\x00" + VALID
    for start in range(0, len(stream), chunk):
        items += reader.feed(stream[start : start + chunk])
    assert all(isinstance(item, Frame | FrameError) for item in items)
    # Whatever came before, the valid frame after a delimiter is read, intact.
    assert items and items[-1] == Frame(
        MessageType.METERSET, 7, {"meterset": 41.5, "dose_rate": 600.0}
    )


# -- the Storage SCP ------------------------------------------------------------------------------


@FUZZ
@given(st.data())
def test_storage_admission_refuses_mutated_bytes_with_a_status(ct_slice, tmp_path_factory, data):
    encoded = bytearray(_part10(ct_slice))
    for _ in range(data.draw(st.integers(1, 6))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(encoded) - 1))
        if action == "flip":
            encoded[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del encoded[at : at + data.draw(st.integers(1, 64))]
        else:
            encoded[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        if not encoded:
            encoded = bytearray(data.draw(st.binary(max_size=64)))
            break
    try:
        header = admit(bytes(encoded), expected_sop_class=CTImageStorage)
    except AdmissionError as exc:
        assert exc.status & 0xF000 in (0xA000, 0xC000)
        return
    assert header.SOPClassUID == CTImageStorage and header.SOPInstanceUID


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    server = ArchiveServer(
        ArchiveConfig(
            data_dir=tmp_path_factory.mktemp("fuzz-archive"),
            port=0,
            accept_any_ae=True,
        )
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def store_association(archive):
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 10
    assoc = ae.associate(*archive.address, ae_title="ARCHIVE")
    assert assoc.is_established
    yield assoc
    if assoc.is_established:
        assoc.release()


REMOVABLE = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "PixelData",
             "BitsAllocated", "Modality"]  # fmt: skip
raw_values = st.tuples(
    st.integers(0x0008, 0x7FE0).map(lambda g: g & ~1 if g % 2 else g),
    st.integers(0x0000, 0xFFFF),
    st.sampled_from(VRS),
    st.binary(max_size=40),
)


@FUZZ
@given(
    st.lists(raw_values, max_size=6),
    st.lists(
        st.sampled_from(
            [
                "PatientID",
                "StudyInstanceUID",
                "SeriesInstanceUID",
                "Rows",
                "PixelData",
                "BitsAllocated",
                "Modality",
            ]
        ),
        max_size=3,
    ),
    st.one_of(st.none(), st.binary(min_size=1, max_size=64)),
)
def test_storage_scp_answers_every_mutated_dataset(
    ct_slice, archive, store_association, raw, removed, instance_uid
):
    ds = Dataset()
    ds.update(ct_slice)
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{abs(hash((tuple(raw), tuple(removed))))}"
    for keyword in removed:
        if keyword in ds:
            del ds[keyword]
    for group, element, vr, value in raw:
        tag = Tag(group, element)
        if tag in (Tag("SOPClassUID"), Tag("SOPInstanceUID")) or element == 0:
            continue
        ds[tag] = RawDataElement(tag, vr, len(value), value, 0, True, True)
    if instance_uid is not None:
        raw_uid = RawDataElement(Tag("SOPInstanceUID"), "UI", len(instance_uid), instance_uid,
                                 0, True, True)  # fmt: skip
        ds[Tag("SOPInstanceUID")] = raw_uid
    try:
        status = store_association.send_c_store(ds)
    except (ValueError, TypeError, AttributeError, KeyError, OverflowError, UnicodeError):
        return  # pynetdicom would not encode or address it: never reached the SCP
    assert status is not None and "Status" in status, "no response: the SCP hung or aborted"
    assert store_association.is_established
    if status.Status == 0x0000:
        stored = archive.store.get(str(ds.SOPInstanceUID))
        assert stored is not None and archive.store.read(stored).SOPInstanceUID


def test_the_archive_still_answers_after_the_fuzzing(archive, store_association):
    assert store_association.send_c_echo().Status == 0x0000


# -- C-FIND identifiers --------------------------------------------------------------------------

KEYWORDS = ["QueryRetrieveLevel", "PatientID", "PatientName", "StudyInstanceUID", "StudyDate",
            "StudyTime", "SeriesInstanceUID", "Modality", "SOPInstanceUID", "SOPClassUID",
            "AccessionNumber", "SeriesNumber", "InstanceNumber", "NumberOfStudyRelatedInstances",
            "ProcedureStepState", "ScheduledProcedureStepStartDateTime", "ProcedureStepLabel",
            "ScheduledStationNameCodeSequence", "ScheduledWorkitemCodeSequence",
            "InputReadinessState", "PatientBirthDate", "SpecificCharacterSet"]  # fmt: skip
texts = st.one_of(
    st.sampled_from(["", "*", "?", "STUDY", "SERIES", "IMAGE", "PATIENT", "20260101-",
                     "-20261231", "20260101-20261231", "1.2.3", "CT", "SCHEDULED", "\\", "^"]),
    st.text(max_size=24),
)  # fmt: skip


def _identifier(pairs: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    for keyword, value in pairs:
        tag = Tag(keyword)
        raw = value.encode("utf-8", "replace")
        ds[tag] = RawDataElement(tag, None, len(raw), raw, 0, True, True)
    return ds


def _fuzz_tms(tmp_path_factory, archive) -> TmsServer:
    return TmsServer(
        TmsConfig(data_dir=tmp_path_factory.mktemp("fuzz-tms"), port=0, accept_any_ae=True),
        archive.store,
        "ARCHIVE",
    )


@pytest.fixture(scope="module")
def tms(tmp_path_factory):
    """A TMS holding one scheduled session (four UPS), so a query has something to match."""
    site = one_session_site(tmp_path_factory.mktemp("fuzz-site"))
    yield site.tms
    site.tms.close_resources()
    site.archive.close_resources()


def _plain(value: str) -> bool:
    """A single value matched exactly (no wildcard, range, list or escape)."""
    return bool(value) and not any(c in value for c in "*?\\-^") and value.isprintable()


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYWORDS), texts), max_size=8))
def test_cfind_identifiers_get_matches_or_a_typed_refusal(archive, tms, pairs):
    identifier = _identifier(pairs)
    try:
        list(StudyRootQuery(archive.store, "ARCHIVE").find(identifier))
    except QueryError as exc:
        assert exc.status & 0xF000 in (0xA000, 0xC000)
    try:
        where, params = tms._ups_query(identifier)
        records = tms.ups.select(where, params)
    except ValueError as exc:
        # TmsServer._on_find answers this with 0xC000 (0xA900 for a mismatch) and the text.
        assert str(exc).strip(), "a refusal must say why"
        return
    if all(value == "" for value in dict(pairs).values()):
        assert len(records) == 4  # universal matching: the whole session
    sent = dict(pairs)  # a keyword given twice: the identifier holds the last value
    plain = {k: v for k, v in sent.items() if k == "ProcedureStepState" and _plain(v)}
    for record in records:
        for keyword, value in plain.items():
            assert record.state == value, (keyword, value, record.state)


@pytest.fixture(scope="module")
def listening_tms(tmp_path_factory, archive):
    server = _fuzz_tms(tmp_path_factory, archive)
    server.start()
    yield server
    server.stop()


UPS_KEYS = ["ProcedureStepState", "PatientID", "PatientName", "ProcedureStepLabel",
            "ScheduledProcedureStepStartDateTime", "StudyInstanceUID", "SOPInstanceUID",
            "ScheduledStationNameCodeSequence", "ScheduledWorkitemCodeSequence"]  # fmt: skip
WRONG_VRS = ["LO", "SH", "CS", "UI", "DT", "PN", "IS", "US", "SQ"]


@settings(max_examples=min(EXAMPLES, 150), deadline=None, database=None)
@given(st.lists(st.tuples(st.sampled_from(UPS_KEYS), st.sampled_from(WRONG_VRS), texts),
                min_size=1, max_size=4))  # fmt: skip
def test_ups_cfind_keys_of_any_vr_get_a_status_with_a_comment(listening_tms, keys):
    """Keys sent in Explicit VR with whatever VR the fuzzer picks: the TMS answers success,
    A900 or C000, each failure with an Error Comment; never pynetdicom's C311 from an
    exception in the handler."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import build_context
    from pynetdicom.sop_class import UnifiedProcedureStepPull

    identifier = Dataset()
    for keyword, vr, text in keys:
        raw = b"" if vr == "SQ" else text[:16].encode("utf-8", "replace")
        raw += b" " * (len(raw) % 2)  # even length, as the wire wants
        tag = Tag(keyword)
        identifier[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    ae = AE(ae_title="FUZZ")
    ae.requested_contexts = [build_context(UnifiedProcedureStepPull, ExplicitVRLittleEndian)]
    assoc = ae.associate(*listening_tms.address, ae_title="TMS")
    assert assoc.is_established
    try:
        statuses = [status for status, _ in assoc.send_c_find(identifier, UnifiedProcedureStepPull)]
    finally:
        assoc.release()
    final = statuses[-1]
    assert final.Status in (0x0000, 0xA900, 0xC000), (keys, final)
    if final.Status:
        assert str(final.get("ErrorComment", "")), (keys, final)


# -- N-ACTION and N-SET replies ------------------------------------------------------------------


class ScriptedTms:
    """A UPS SCP whose replies the fuzzer chooses: any status, any reply attributes."""

    def __init__(self, profile) -> None:
        self.reply: tuple[int, Dataset | None] = (0, None)
        ae = make_ae("TMS", NetworkSettings(dimse_timeout=10))
        for name in ("ups_push", "ups_pull"):
            ae.add_supported_context(profile.sop_classes[name])
        handlers = [(evt.EVT_N_ACTION, self._answer), (evt.EVT_N_SET, self._answer)]
        self.server = start_server(ae, "127.0.0.1", 0, handlers)

    def _answer(self, event):
        status, reply = self.reply
        return status, reply


@pytest.fixture(scope="module")
def scripted():
    profile = load_profile("ihe-ro-2008", "final")
    tms_scp = ScriptedTms(profile)
    peer = Peer("TMS", *tms_scp.server.server_address[:2])
    connections: list[UpsConnection] = []

    def connect() -> UpsConnection:
        """The open association, or a new one when the last reply ended it."""
        if connections and connections[-1].assoc.is_established:
            return connections[-1]
        settings = NetworkSettings(dimse_timeout=2, acse_timeout=5)
        connection = UpsConnection("FUZZDEV", peer, profile, settings)
        connections.append(connection.__enter__())
        return connection

    yield tms_scp, connect, connections
    for connection in connections:
        connection.__exit__(None, None, None)
    tms_scp.server.shutdown()


replies = st.one_of(
    st.none(),
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "ProcedureStepState",
                    "TransactionUID",
                    "ErrorComment",
                    "ProcedureStepProgressInformationSequence",
                    "PatientID",
                    "ReasonForCancellation",
                ]
            ),
            texts,
        ),
        max_size=4,
    ),
)  # fmt: skip  (pairs, not a Dataset: hypothesis must be able to print a failing example)
statuses = st.one_of(
    st.sampled_from([0x0000, 0x0001, 0xB300, 0xB304, 0xC300, 0xC301, 0xC302, 0xC307, 0xC310,
                     0xC311, 0xC312, 0x0110, 0x0112, 0x0117, 0xA700, 0xFE00, 0xFF00]),
    st.integers(0, 0xFFFF),
)  # fmt: skip
lock = threading.Lock()
# Not empty: pynetdicom announces a data set for an empty one and sends none, and the SCP
# waits for it (noted in docs/architecture.md).
MODIFICATION = _identifier([("ProcedureStepLabel", "fuzz")])


@FUZZ
@given(statuses, replies, st.booleans())
def test_performer_handles_any_n_action_or_n_set_reply(scripted, status, reply, action):
    tms_scp, connect, _ = scripted
    with lock:
        tms_scp.reply = (status, None if reply is None else _identifier(reply))
        connection = connect()
        try:
            if action:
                answer = connection.change_state("1.2.3.4", "IN PROGRESS", "1.2.3.5")
                got = answer.status
            else:
                got = connection.n_set("1.2.3.4", MODIFICATION)
            # A refusal is never seen as success (the workflow takes only 0x0000 as a claim,
            # a progress or a completion). A success whose reply pynetdicom could not encode
            # arrives as a failure, which is safe.
            assert isinstance(got, int) and (got != 0 or status == 0)
        except DimseError:
            pass  # no usable reply, or the association ended: a DIMSE failure, reported


def test_the_performer_still_talks_to_the_tms_after_the_fuzzing(scripted):
    tms_scp, connect, connections = scripted
    with lock:
        tms_scp.reply = (0x0000, None)
        assert connect().n_set("1.2.3.4", MODIFICATION) == 0x0000
    assert len(connections) >= 1


# -- N-CREATE, N-SET and N-ACTION data sets ----------------------------------------------------


@pytest.fixture(scope="module")
def listening_site(tmp_path_factory):
    """A started reference site with one session: N-SETs and N-ACTIONs have UPS to name."""
    site = one_session_site(tmp_path_factory.mktemp("fuzz-requests"), accept_any_ae=True)
    addresses = site.start()
    yield site, addresses["TMS"][1]
    site.stop()


# Elements no UPS request may carry: the command group, the file meta group, private and
# unknown tags; and UPS attributes sent under any VR. (A group length cannot be sent:
# pydicom's encoder drops it, and pynetdicom then announces a data set it never sends.)
ODD_TAGS = [0x00001000, 0x00000900, 0x00001001, 0x00020010, 0x00091010, 0x00290010,
            0x0008FFF0, 0x7FE10010]  # fmt: skip
UPS_TAGS = [Tag(k) for k in ("ProcedureStepState", "TransactionUID", "ProcedureStepLabel",
            "ProcedureStepProgressInformationSequence", "ScheduledProcedureStepPriority",
            "ReasonForCancellation", "PatientID")]  # fmt: skip
elements = st.tuples(st.sampled_from(ODD_TAGS + UPS_TAGS), st.sampled_from(WRONG_VRS), texts)


@settings(
    max_examples=min(EXAMPLES, 300),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much],
)
@given(
    st.sampled_from(["N-CREATE", "N-SET", "N-ACTION 1", "N-ACTION 2", "N-ACTION 3"]),
    st.lists(elements, min_size=1, max_size=4),
)
def test_malformed_request_data_sets_get_a_failure_with_a_comment(listening_site, request, items):
    """Each request's data set with elements it may not carry or under a VR not theirs
    (Explicit VR, so the VR travels): a status with an Error Comment, never 0x0110 (the
    status pynetdicom answers when a handler raises)."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom import build_context

    uids = load_profile().sop_classes
    ds = Dataset()
    for tag, vr, text in items:
        raw = b"" if vr == "SQ" else text[:16].encode("utf-8", "replace")
        raw += b" " * (len(raw) % 2)
        ds[tag] = RawDataElement(Tag(tag), vr, len(raw), raw, 0, False, True)
    # What pydicom cannot write (an IS of "Inf") never reaches the wire from here.
    assume(bool(encode_dataset(ds, False, True)))
    site, port = listening_site
    uid = str(site.tms.ups.select()[0].sop_instance_uid)
    ae = AE(ae_title="FUZZ")
    ae.requested_contexts = [
        build_context(uids[name], ExplicitVRLittleEndian)
        for name in ("ups_push", "ups_pull", "ups_watch")
    ]
    assoc = ae.associate("127.0.0.1", port, ae_title="TMS")
    assert assoc.is_established
    try:
        if request == "N-CREATE":
            status, _ = assoc.send_n_create(ds, uids["ups_push"], str(generate_uid()))
        elif request == "N-SET":
            status, _ = assoc.send_n_set(ds, uids["ups_push"], uid, meta_uid=uids["ups_pull"])
        else:
            action = int(request[-1])
            context = uids["ups_watch"] if action == 3 else uids["ups_pull"]
            if action == 2:
                context = uids["ups_push"]
            status, _ = assoc.send_n_action(ds, action, uids["ups_push"], uid, meta_uid=context)
    finally:
        assoc.release()
    assert status is not None and "Status" in status, (request, items)
    assert status.Status != 0x0110, (request, items, status)
    if status.Status & 0xF000 in (0xA000, 0xC000) or status.Status in range(0x0100, 0x0300):
        assert str(status.get("ErrorComment", "")), (request, items, status)


def test_an_n_set_carrying_a_command_element_names_it(listening_site):
    """(0000,1000) Affected SOP Instance UID inside an N-SET's data set: 0105 with an Error
    Comment naming the element; pydicom raised while storing it and the answer was 0110."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import build_context

    uids = load_profile().sop_classes
    site, port = listening_site
    uid = str(site.tms.ups.select()[0].sop_instance_uid)
    ds = Dataset()
    raw = b"1.2.3.4\x00"
    ds[0x00001000] = RawDataElement(Tag(0x00001000), "UI", len(raw), raw, 0, False, True)
    ae = AE(ae_title="FUZZ")
    ae.requested_contexts = [build_context(uids["ups_pull"], ExplicitVRLittleEndian)]
    assoc = ae.associate("127.0.0.1", port, ae_title="TMS")
    try:
        status, _ = assoc.send_n_set(ds, uids["ups_push"], uid, meta_uid=uids["ups_pull"])
    finally:
        assoc.release()
    assert status.Status == 0x0105
    assert "(0000,1000)" in status.ErrorComment and "command group" in status.ErrorComment
