"""Checks a dataset against an attribute table from ``profiles/iods.yaml``.

It exists for IODs that Debian's dciodvfy cannot validate (it reports "Information
Object Not found" for the RT Beams Delivery Instruction), so that every object the
project writes is still checked against its required attributes.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from emulator.profile import load_yaml


def _present(ds: Dataset, keyword: str) -> bool:
    return keyword in ds


def _empty(ds: Dataset, keyword: str) -> bool:
    value = ds[keyword].value
    return value is None or value == "" or value == []


def _check(ds: Dataset, parts: list[str], rule: dict, where: str, problems: list[str]) -> None:
    keyword = parts[0]
    if len(parts) > 1:
        if keyword not in ds:
            return  # the parent's own rule reports its absence
        for index, item in enumerate(ds[keyword].value):
            _check(item, parts[1:], rule, f"{where}{keyword}[{index}]>", problems)
        return
    kind = str(rule["type"])
    when = rule.get("when")
    if when and not all(str(ds.get(k, "")) == v for k, v in when.items()):
        if kind.endswith("C") and _present(ds, keyword):
            problems.append(f"{where}{keyword}: present although its condition is not met")
        return
    if not _present(ds, keyword):
        if kind.startswith(("1", "2")):
            problems.append(f"{where}{keyword}: missing (type {kind})")
        return
    if kind.startswith("1") and _empty(ds, keyword):
        problems.append(f"{where}{keyword}: empty (type {kind})")
        return
    if "items" in rule and len(ds[keyword].value) != int(rule["items"]):
        problems.append(f"{where}{keyword}: needs exactly {rule['items']} item(s)")
    if "values" in rule and str(ds[keyword].value) not in rule["values"]:
        problems.append(f"{where}{keyword}: {ds[keyword].value!r} not in {rule['values']}")


def check_iod(ds: Dataset, iod: str) -> list[str]:
    """Problems found, each naming the attribute path; an empty list means it conforms."""
    table = load_yaml("iods.yaml")[iod]
    problems: list[str] = []
    for rule in table["attributes"]:
        _check(ds, rule["path"].split(">"), rule, "", problems)
    return problems
