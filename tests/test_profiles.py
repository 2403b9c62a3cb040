"""Profile editions are data, and the code holds no edition literal of its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from emulator.profile import ProfileError, load_profile, load_sop_classes, workitem_codes

REPO = Path(__file__).resolve().parent.parent


def test_ihe_ro_2008_follows_the_seed():
    profile = load_profile("ihe-ro-2008")
    delivery_type = profile.concept("treatment_delivery_type")
    assert (delivery_type.value, delivery_type.scheme, delivery_type.meaning) == (
        "2008001",
        "99IHERO2008",
        "Treatment Delivery Type",
    )
    beam = profile.concept("beam_number_in_progress")
    assert (beam.value, beam.scheme, beam.meaning) == (
        "121700",
        "DCM",
        "Referenced Beam Number in Progress",
    )
    assert profile.performer_may_send_empty_transaction_uid is True


def test_tdw_ii_uses_final_codes():
    profile = load_profile("tdw-ii")
    assert profile.concept("treatment_delivery_type").as_item() == {
        "CodeValue": "121740",
        "CodingSchemeDesignator": "DCM",
        "CodeMeaning": "Treatment Delivery Type",
    }
    assert (profile.concept("beam_number_in_progress").value, "99IHERO2018") == (
        "2018004",
        profile.concept("beam_number_in_progress").scheme,
    )
    assert profile.performer_may_send_empty_transaction_uid is False
    assert [profile.concept(n).value for n in profile.scheduled_parameters] == [
        "2018001",
        "2018002",
        "2018003",
    ]


def test_uid_sets_final_is_default_and_trial_is_selectable():
    final = load_profile().sop_classes
    trial = load_profile(uid_set="trial").sop_classes
    assert final.uid_set == "final"
    assert final["ups_push"] == "1.2.840.10008.5.1.4.34.6.1"
    assert final["ups_pull"] == "1.2.840.10008.5.1.4.34.6.3"
    assert final["rt_beams_delivery_instruction"] == "1.2.840.10008.5.1.4.34.7"
    assert trial["ups_push"] == "1.2.840.10008.5.1.4.34.4.1"
    assert trial["rt_beams_delivery_instruction"] == "1.2.840.10008.5.1.4.34.1"
    assert final["rt_plan"] == trial["rt_plan"] == "1.2.840.10008.5.1.4.1.1.481.5"
    with pytest.raises(ProfileError):
        trial["ups_query"]  # no draft UID exists for UPS Query


def test_archive_storage_covers_every_seed_table():
    storage = load_sop_classes().archive_storage()
    assert set(storage) >= {
        "RO-18/Table-3.18-1",
        "RO-22/Table-3.22-2",
        "RO-23/Table-3.23-2",
        "RO-24/Table-3.24-2",
    }
    uids = set(load_sop_classes().archive_storage_uids())
    assert {
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.481.1",
        "1.2.840.10008.5.1.4.1.1.481.2",
        "1.2.840.10008.5.1.4.1.1.481.3",
        "1.2.840.10008.5.1.4.1.1.481.4",
        "1.2.840.10008.5.1.4.1.1.481.5",
        "1.2.840.10008.5.1.4.1.1.66.1",
        "1.2.840.10008.5.1.4.1.1.66.3",
    } <= uids


def test_unknown_names_are_refused_clearly():
    with pytest.raises(ProfileError, match="unknown edition"):
        load_profile("ihe-ro-1999")
    with pytest.raises(ProfileError, match="unknown UID set"):
        load_sop_classes("draft")
    with pytest.raises(ProfileError, match="no concept"):
        load_profile().concept("plan_label")


def test_workitem_codes_cover_the_four_session_steps():
    codes = workitem_codes()
    assert codes["121726"].meaning == "RT Treatment with Internal Verification"
    assert all(str(c) in codes for c in range(121702, 121723))


def test_no_edition_literal_outside_profiles():
    """Edition codes and draft UIDs may appear only in profiles/ (and tests)."""
    pattern = re.compile(r"2008001|99IHERO|121740|2018004|121700|1\.2\.840\.10008\.5\.1\.4\.34\.")
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for folder in ("emulator", "devices", "hil")
        for path in (REPO / folder).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


# A rule id as a whole string literal in the conformance checks' code.
RULE_LITERAL = re.compile(r'"((?:RO-\d+|CC|DIMSE|Appendix-A)/[^"\s]+)"')


def _named_in(node) -> set[str]:
    """Rule ids a YAML structure names: values of ``rule`` keys, ``findings`` lists."""
    if isinstance(node, dict):
        names = {node["rule"]} if isinstance(node.get("rule"), str) else set()
        for key in ("findings", "expected_findings"):
            names |= set(node.get(key) or [])
        return names.union(*(_named_in(v) for k, v in node.items() if k != "rule"))
    if isinstance(node, list):
        return set().union(*(_named_in(v) for v in node))
    return set()


def test_every_rule_named_anywhere_is_in_the_rule_table_and_none_is_dead():
    """A check (code), a scenario step or a table entry that names a rule the table lacks
    would fail mid-run with a KeyError (RuleBook.finding); a rule nobody names is judged by
    nothing. Both are table errors."""
    root = Path(__file__).resolve().parent.parent
    table = yaml.safe_load((root / "profiles" / "rules.yaml").read_text(encoding="utf-8"))
    listed = [rule["id"] for rule in table["rules"]]
    assert len(listed) == len(set(listed)), "a rule id is listed twice"
    code = "\n".join(
        p.read_text(encoding="utf-8") for p in (root / "emulator" / "conformance").rglob("*.py")
    )
    scenarios = yaml.safe_load((root / "profiles" / "scenarios.yaml").read_text(encoding="utf-8"))
    named = set(RULE_LITERAL.findall(code)) | _named_in(scenarios)
    named |= _named_in({k: v for k, v in table.items() if k != "rules"})
    assert named - set(listed) == set(), "named but not in profiles/rules.yaml"
    assert set(listed) - named == set(), "in profiles/rules.yaml but named by nothing"
