"""Appendix A of the seed applied to DICOM objects: copy rules across objects, constraints within.

Used on what the performing devices retrieve during a scenario and on files at rest
(``tdw-emu validate``). The attribute tables live in ``profiles/rules.yaml``; this module
only knows how to walk paths and compare values.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from emulator.conformance.brachy_rules import brachy_record_problems
from emulator.conformance.rulebook import Finding, RuleBook, attribute_label
from emulator.profile import SopClasses

# Which class is the Appendix A "Source" when values disagree, most authoritative first.
SOURCE_ORDER = ("ct_image", "rt_structure_set", "rt_plan", "rt_dose")
CLASS_LABELS = {
    "ct_image": "CT Image",
    "rt_structure_set": "RT Structure Set",
    "rt_plan": "RT Plan",
    "rt_dose": "RT Dose",
    "rt_beams_delivery_instruction": "RT Beams Delivery Instruction",
    "rt_beams_treatment_record": "RT Beams Treatment Record",
    "rt_brachy_treatment_record": "RT Brachy Treatment Record",
    "spatial_registration": "Spatial Registration",
    "rt_image": "RT Image",
}


@dataclass
class DicomObject:
    """One object and the name of its SOP class in the active UID set."""

    dataset: Dataset
    class_name: str
    source: str = ""  # file path or where it was received

    @property
    def uid(self) -> str:
        return str(self.dataset.get("SOPInstanceUID", ""))

    @property
    def label(self) -> str:
        kind = CLASS_LABELS.get(self.class_name, self.class_name or "object")
        if self.class_name == "ct_image":
            return f"{kind} series {self.dataset.get('SeriesInstanceUID', '')}"
        return f"{kind} {self.uid}"


def wrap(datasets: Iterable[Dataset], uids: SopClasses, source: str = "") -> list[DicomObject]:
    return [
        DicomObject(ds, uids.name_of(str(ds.get("SOPClassUID", ""))) or "", source)
        for ds in datasets
    ]


# -- paths ---------------------------------------------------------------------------------


def parents_along(ds: Dataset, parts: list[str], where: str = "") -> Iterator[tuple[str, Dataset]]:
    """(location, dataset holding the last keyword) for every item along a '>' path."""
    if len(parts) == 1:
        yield where, ds
        return
    if parts[0] not in ds:
        return
    for index, item in enumerate(ds[parts[0]].value or []):
        yield from parents_along(item, parts[1:], f"{where}{parts[0]}[{index}]>")


def _empty(value: object) -> bool:
    return value is None or value == "" or (isinstance(value, list | tuple) and not value)


def _same(a: object, b: object) -> bool:
    try:
        return math.isclose(float(a), float(b), abs_tol=1e-9)
    except (TypeError, ValueError):
        return str(a).strip() == str(b).strip()


def _problem(check: str, value: object, ds: Dataset, keyword: str) -> str | None:
    """What is wrong with one attribute under one check, or None."""
    if check == "present":
        return None if keyword in ds else "missing"
    if keyword not in ds:
        return "missing"
    actual = ds[keyword].value
    if check == "not_empty":
        return "empty" if _empty(actual) else None
    if check == "equals":
        return None if _same(actual, value) else f"is {actual!r}, must be {value!r}"
    if check == "in":
        return None if any(_same(actual, v) for v in value) else f"is {actual!r}, not in {value}"
    if check in ("items", "items_between"):
        count = len(actual or [])
        low, high = (value, value) if check == "items" else value
        return None if low <= count <= high else f"has {count} item(s), needs {low}-{high}"
    if check == "same_as":
        other = ds.get(value)
        return None if _same(actual, other) else f"is {actual}, must equal {value} ({other})"
    if check == "one_less_than":
        other = ds.get(value)
        ok = other is not None and _same(actual, float(other) - 1)
        return None if ok else f"is {actual}, must be {value} ({other}) - 1"
    if check == "first_equals":
        first = actual[0] if isinstance(actual, list | tuple | MultiValue) else actual
        return None if _same(first, value) else f"starts at {first}, must start at {value}"
    if check == "equals_tag":
        tags = actual if isinstance(actual, list | tuple) else [actual]
        wanted = int(str(value), 16)
        return None if [int(t) for t in tags] == [wanted] else f"is {actual}, must be ({value})"
    if check == "axial":
        cosines = [float(v) for v in actual]
        row, col = cosines[:3], cosines[3:]

        def angle(vector: list[float], axis: int) -> float:
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            return math.acos(min(1.0, abs(vector[axis]) / norm))

        worst = max(angle(row, 0), angle(col, 1))
        return None if worst <= float(value) else f"is {actual}, not axial within {value} rad"
    raise ValueError(f"unknown check {check!r} in profiles/rules.yaml")


def constraint_tables(obj: DicomObject, book: RuleBook) -> list[dict]:
    """The constraint tables that judge ``obj``: those of its class (the key, or the
    table's ``class``) whose ``when_present`` / ``unless_present`` attribute says so."""
    chosen = []
    for name, table in book.tables()["object_constraints"].items():
        if table.get("class", name) != obj.class_name or table["rule"] not in book:
            continue
        if "when_present" in table and table["when_present"] not in obj.dataset:
            continue
        if "unless_present" in table and table["unless_present"] in obj.dataset:
            continue
        chosen.append(table)
    return chosen


def constraint_findings(obj: DicomObject, book: RuleBook) -> list[Finding]:
    """Appendix A.2/A.3 constraints for one object (profiles/rules.yaml object_constraints)."""
    findings = []
    for table in constraint_tables(obj, book):
        findings += _table_findings(obj, book, table)
    return findings


def _table_findings(obj: DicomObject, book: RuleBook, table: dict) -> list[Finding]:
    findings = []
    for constraint in table["constraints"]:
        parts = constraint["path"].split(">")
        keyword, check, value = parts[-1], constraint["check"], constraint.get("value")
        parents = list(parents_along(obj.dataset, parts))
        if check in ("unique", "contains"):
            values = [str(p[keyword].value) for _, p in parents if keyword in p]
            if check == "unique":
                repeated = sorted(v for v, n in Counter(values).items() if n > 1)
                problem = f"repeats {repeated}" if repeated else None
            else:
                problem = None if value in values else f"has no item with {value!r}"
            if problem:
                findings.append(
                    book.finding(
                        table["rule"],
                        f"{obj.label}: {constraint['path']} {problem}",
                        attribute_label(constraint["path"]),
                        obj.source,
                    )
                )
            continue
        for where, parent in parents:
            problem = _problem(check, value, parent, keyword)
            if problem:
                why = f" ({constraint['why']})" if "why" in constraint else ""
                findings.append(
                    book.finding(
                        table["rule"],
                        f"{obj.label}: {where}{keyword} {problem}{why}",
                        attribute_label(constraint["path"]),
                        obj.source,
                    )
                )
    return findings


# -- copy rules across objects -------------------------------------------------------------


def _attribute_of(obj: DicomObject, keyword: str) -> str | None:
    """The value an object gives an Appendix A.1 attribute; structure sets nest their frame."""
    ds = obj.dataset
    if keyword == "FrameOfReferenceUID" and obj.class_name == "rt_structure_set":
        frames = ds.get("ReferencedFrameOfReferenceSequence") or []
        return str(frames[0].get("FrameOfReferenceUID", "")) if frames else None
    if keyword not in ds:
        return None
    value = ds[keyword].value
    return "" if value is None else str(value)


def _references(obj: DicomObject) -> set[str]:
    """UIDs (instances and series) an object points at: plan -> structure set, dose -> plan."""
    found: set[str] = set()

    def walk(ds: Dataset) -> None:
        for element in ds:
            if element.VR == "SQ":
                for item in element.value or []:
                    walk(item)
            elif element.keyword in ("ReferencedSOPInstanceUID", "SeriesInstanceUID") and (
                ds is not obj.dataset
            ):
                found.add(str(element.value))

    walk(obj.dataset)
    return found


def _linked_groups(
    objects: list[DicomObject], session_links: Iterable[Iterable[str]] = ()
) -> list[list[DicomObject]]:
    """Objects of one patient: joined by references, sessions, Patient ID or Study UID."""
    parent = list(range(len(objects)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    by_key: dict[str, list[int]] = defaultdict(list)
    for index, obj in enumerate(objects):
        ds = obj.dataset
        by_key[f"sop:{obj.uid}"].append(index)
        by_key[f"series:{ds.get('SeriesInstanceUID', '')}"].append(index)
        if str(ds.get("PatientID", "")):
            by_key[f"patient:{ds.PatientID}"].append(index)
        if str(ds.get("StudyInstanceUID", "")):
            by_key[f"study:{ds.StudyInstanceUID}"].append(index)
    for members in by_key.values():
        for other in members[1:]:
            union(members[0], other)
    for index, obj in enumerate(objects):
        for uid in _references(obj):
            for key in (f"sop:{uid}", f"series:{uid}"):
                for other in by_key.get(key, []):
                    union(index, other)
    uid_index = {obj.uid: i for i, obj in enumerate(objects)}
    for link in session_links:
        members = [uid_index[u] for u in link if u in uid_index]
        for other in members[1:]:
            union(members[0], other)
    groups: dict[int, list[DicomObject]] = defaultdict(list)
    for index, obj in enumerate(objects):
        groups[find(index)].append(obj)
    return list(groups.values())


def _rank(obj: DicomObject) -> int:
    return SOURCE_ORDER.index(obj.class_name) if obj.class_name in SOURCE_ORDER else 99


def copy_findings(
    objects: list[DicomObject], book: RuleBook, session_links: Iterable[Iterable[str]] = ()
) -> list[Finding]:
    """Appendix A.1: the same value of each mapped attribute in every related object."""
    findings: list[Finding] = []
    for rule in book.tables()["copy_rules"]:
        if rule["rule"] not in book:
            continue
        if rule["scope"] == "study":
            by_study: dict[str, list[DicomObject]] = defaultdict(list)
            for obj in objects:
                by_study[str(obj.dataset.get("StudyInstanceUID", ""))].append(obj)
            groups = [g for key, g in by_study.items() if key]
        else:
            groups = _linked_groups(objects, session_links)
        classes = rule.get("classes")
        for group in groups:
            members = sorted(
                (o for o in group if not classes or o.class_name in classes), key=_rank
            )
            for keyword in rule["attributes"]:
                valued = [(o, _attribute_of(o, keyword)) for o in members]
                valued = [(o, v) for o, v in valued if v is not None]
                if len({v for _, v in valued}) <= 1:
                    continue
                source, expected = valued[0]
                reported: set[str] = set()
                for obj, value in valued[1:]:
                    if value == expected or obj.label in reported:
                        continue
                    reported.add(obj.label)
                    findings.append(
                        book.finding(
                            rule["rule"],
                            f"{obj.label} has {keyword} {value!r}, but the {source.label} "
                            f"has {expected!r}",
                            attribute_label(keyword),
                            obj.source,
                        )
                    )
    return findings


def appendix_a_findings(
    objects: list[DicomObject], book: RuleBook, session_links: Iterable[Iterable[str]] = ()
) -> list[Finding]:
    """Everything Appendix A says about this set of objects, and what a brachy record
    must hold together (RO-24/Brachy-record)."""
    findings = copy_findings(objects, book, session_links)
    for obj in objects:
        findings.extend(constraint_findings(obj, book))
    findings.extend(brachy_record_findings(objects, book))
    return findings


def brachy_record_findings(objects: list[DicomObject], book: RuleBook) -> list[Finding]:
    """RO-24/Brachy-record for each RT Brachy Treatment Record, against its plan when the
    set holds it."""
    plans = {o.uid: o.dataset for o in objects if o.class_name == "rt_plan"}
    plan_class = next(
        (str(o.dataset.SOPClassUID) for o in objects if o.class_name == "rt_plan"),
        "1.2.840.10008.5.1.4.1.1.481.5",
    )
    findings = []
    for obj in objects:
        if obj.class_name != "rt_brachy_treatment_record":
            continue
        refs = obj.dataset.get("ReferencedRTPlanSequence") or []
        plan = plans.get(str(refs[0].get("ReferencedSOPInstanceUID", ""))) if refs else None
        for problem in brachy_record_problems(obj.dataset, plan_class, plan):
            findings.append(book.finding("RO-24/Brachy-record", problem, where=obj.label))
    return findings


# -- files at rest -------------------------------------------------------------------------


def read_files(paths: Iterable[Path], uids: SopClasses) -> tuple[list[DicomObject], list[str]]:
    """DICOM files under the given paths (directories recursed); unreadable ones reported."""
    objects, unreadable = [], []
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            unreadable.append(f"{path}: {exc}")
            continue
        objects.extend(wrap([ds], uids, str(path)))
    return objects, unreadable
