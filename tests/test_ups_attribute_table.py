"""PS3.4 Table CC.2.5-3 as data (profiles/ups_attributes.yaml) and CID 9300 reasons
(profiles/discontinuation_reasons.yaml), checked against pydicom's copy of the standard."""

from __future__ import annotations

import re

import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes

from emulator import ups_attributes
from emulator.profile import load_yaml

ROWS = list(ups_attributes.walk())
TYPE = re.compile(r"^(-|[123]C?)/(-|[123]C?)$")


def _tag(text: str) -> int:
    group, element = text.strip("()").split(",")
    return int(group, 16) << 16 | int(element, 16)


@pytest.mark.parametrize(("path", "row"), ROWS, ids=[p for p, _ in ROWS])
def test_each_row_names_a_real_attribute(path, row):
    assert tag_for_keyword(row.keyword) == _tag(row.tag), f"{row.keyword} is not {row.tag}"
    assert keyword_for_tag(_tag(row.tag)) == row.keyword
    assert (dictionary_VR(_tag(row.tag)) == "SQ") == bool(row.is_sequence), path
    for column in (row.n_create, row.n_set, row.n_get):
        assert column == "Not allowed" or TYPE.match(column), f"{path}: type {column!r}"
    assert row.final in load_yaml("ups_attributes.yaml")["codes"]
    if row.final == "RC":
        assert row.condition in load_yaml("ups_attributes.yaml")["conditions"], path
    else:
        assert not row.condition, f"{path}: only RC rows have a condition"


def test_the_table_covers_every_attribute_the_project_sends_or_keeps():
    """Each top-level attribute of a UPS the reference TMS schedules, and of each request a
    device sends, has its row: nothing is judged by a list outside the table."""
    from emulator.performer.workflow import cancel_dataset, final_update_dataset, progress_dataset
    from emulator.profile import load_profile
    from emulator.synth.common import code_item

    ups = Dataset()
    ups.ScheduledWorkitemCodeSequence = Sequence([code_item("121726", "DCM", "x")])
    profile = load_profile("tdw-ii", "final")
    import datetime as dt

    requests = [
        progress_dataset(profile, "1.2.3", 10.0, 2),
        cancel_dataset("1.2.3", 10.0, "interlock", "interlock"),
        final_update_dataset(ups, "LINAC1", "1.2.3", dt.datetime.now(), [], "ARCHIVE", "final"),
    ]
    known = {path for path, _ in ROWS}
    for request in requests:
        for element in request:
            assert element.keyword in known, element.keyword
            if element.VR == "SQ" and element.keyword in (
                "ProcedureStepProgressInformationSequence",
                "UnifiedProcedureStepPerformedProcedureSequence",
            ):
                for inner in element.value[0]:
                    assert f"{element.keyword}>{inner.keyword}" in known, inner.keyword


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (
            "CANCELED",
            {
                "ProcedureStepProgressInformationSequence>ProcedureStepCancellationDateTime",
                "ProcedureStepProgressInformationSequence>"
                "ProcedureStepDiscontinuationReasonCodeSequence",
            },
        ),
        (
            "COMPLETED",
            {
                "UnifiedProcedureStepPerformedProcedureSequence",
            },
        ),
    ],
)
def test_the_performer_owes_p_and_x_rows(state, expected):
    """An empty progress item owes its X rows; no Performed Procedure item owes the
    sequence itself. R rows are the scheduler's, not the performer's."""
    request = Dataset()
    request.ProcedureStepProgressInformationSequence = Sequence([Dataset()])
    request.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress = 10
    assert set(ups_attributes.performer_missing([request], state)) == expected


def test_rc_rows_apply_only_where_their_condition_holds():
    ups = Dataset()
    performed = Dataset()
    ups.UnifiedProcedureStepPerformedProcedureSequence = Sequence([performed])
    missing = ups_attributes.missing_for_final_state(ups, "COMPLETED")
    assert not any("HumanPerformer" in p for p in missing)
    performer = Dataset()
    performed.ActualHumanPerformersSequence = Sequence([performer])
    missing = ups_attributes.missing_for_final_state(ups, "COMPLETED")
    assert any(p.endswith(">HumanPerformerName") for p in missing)
    ups.PatientName = "Müller^Jörg"
    assert "SpecificCharacterSet" in ups_attributes.missing_for_final_state(ups, "COMPLETED")


def test_error_comment_fits_lo_and_names_what_the_performer_owes_first():
    missing = ups_attributes.missing_for_final_state(Dataset(), "CANCELED")
    comment = ups_attributes.final_state_comment(missing)
    assert len(comment) <= 64
    assert comment.startswith("missing ProcedureStepProgressInformationSequence")


@pytest.mark.parametrize("cause", ups_attributes.discontinuation_causes())
def test_each_cause_has_a_cid_9300_code(cause):
    reason = ups_attributes.discontinuation_reason(cause)
    cid = [getattr(codes.cid9300, name) for name in codes.cid9300.dir()]
    assert (reason.value, reason.scheme) in {(c.value, c.scheme_designator) for c in cid}
    assert reason.scheme == "DCM"


def test_transaction_uid_is_never_returned():
    assert "TransactionUID" in ups_attributes.never_returned()
