"""Loads IHE-RO profile editions and the DICOM tables kept in ``profiles/``.

Everything that differs between the seed's 2008 draft and later editions (codes,
SOP Class UIDs, Transaction UID behaviour) lives in YAML so that the rest of the
code asks for a concept by name and never holds an edition literal.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

EDITIONS = ("ihe-ro-2008", "tdw-ii")
UID_SETS = ("final", "trial")
DEFAULT_EDITION = "ihe-ro-2008"
DEFAULT_UID_SET = "final"


class ProfileError(ValueError):
    """Raised when a profile name, UID set or concept is unknown."""


@dataclass(frozen=True)
class Code:
    """A coded concept (Code Value, Coding Scheme Designator, Code Meaning)."""

    value: str
    scheme: str
    meaning: str
    reference: str = ""

    def as_item(self) -> dict[str, str]:
        """Keyword/value pairs for a DICOM code sequence item."""
        return {
            "CodeValue": self.value,
            "CodingSchemeDesignator": self.scheme,
            "CodeMeaning": self.meaning,
        }


@functools.cache
def load_yaml(name: str) -> dict[str, Any]:
    """Reads one YAML file shipped in the ``profiles`` package."""
    try:
        text = resources.files("profiles").joinpath(name).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ProfileError(f"no profile file {name!r} in profiles/") from exc
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ProfileError(f"profiles/{name} does not hold a mapping")
    return data


@dataclass(frozen=True)
class SopClasses:
    """One selected UID set (final or trial) merged with the UIDs common to both."""

    uid_set: str
    uids: dict[str, str]
    reference_style: str = "access_macro"

    def __getitem__(self, name: str) -> str:
        try:
            return self.uids[name]
        except KeyError as exc:
            raise ProfileError(
                f"SOP class {name!r} is not defined in UID set {self.uid_set}"
            ) from exc

    def name_of(self, uid: str) -> str | None:
        """The profile's name for a SOP Class UID, or None when it is not in this set."""
        for name, value in self.uids.items():
            if value == uid:
                return name
        return None

    def archive_storage(self) -> dict[str, list[str]]:
        """SOP Class UIDs the Archive must store, keyed by the seed table that asks for them."""
        table = load_yaml("sop_classes.yaml")["archive_storage"]
        return {ref: [self[name] for name in names] for ref, names in table.items()}

    def archive_storage_uids(self) -> list[str]:
        """De-duplicated union of :meth:`archive_storage`, in a stable order."""
        seen: dict[str, None] = {}
        for uids in self.archive_storage().values():
            for uid in uids:
                seen.setdefault(uid, None)
        return list(seen)


def load_sop_classes(uid_set: str = DEFAULT_UID_SET) -> SopClasses:
    """The SOP Class UIDs of the final standard (default) or of the seed's drafts."""
    data = load_yaml("sop_classes.yaml")
    if uid_set not in data["uid_sets"]:
        raise ProfileError(f"unknown UID set {uid_set!r}; choose one of {', '.join(UID_SETS)}")
    return SopClasses(
        uid_set,
        {**data["common"], **data["uid_sets"][uid_set]},
        data["reference_styles"][uid_set],
    )


@dataclass(frozen=True)
class Profile:
    """An IHE-RO edition together with the selected SOP Class UID set."""

    edition: str
    title: str
    concepts: dict[str, Code]
    performer_may_send_empty_transaction_uid: bool
    scheduled_parameters: tuple[str, ...]
    sop_classes: SopClasses
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def concept(self, name: str) -> Code:
        """The edition's code for a named concept, e.g. ``treatment_delivery_type``."""
        try:
            return self.concepts[name]
        except KeyError as exc:
            raise ProfileError(f"edition {self.edition} defines no concept {name!r}") from exc


def load_profile(edition: str = DEFAULT_EDITION, uid_set: str = DEFAULT_UID_SET) -> Profile:
    """Loads ``profiles/<edition>.yaml`` and binds it to a UID set."""
    if edition not in EDITIONS:
        raise ProfileError(f"unknown edition {edition!r}; choose one of {', '.join(EDITIONS)}")
    data = load_yaml(f"{edition}.yaml")
    concepts = {
        name: Code(
            value=str(item["code_value"]),
            scheme=str(item["coding_scheme_designator"]),
            meaning=str(item["code_meaning"]),
            reference=str(item.get("reference", "")),
        )
        for name, item in data["concepts"].items()
    }
    return Profile(
        edition=data["id"],
        title=data["title"],
        concepts=concepts,
        performer_may_send_empty_transaction_uid=bool(
            data["transaction_uid"]["performer_may_send_empty"]
        ),
        scheduled_parameters=tuple(data.get("scheduled_parameters") or ()),
        sop_classes=load_sop_classes(uid_set),
        raw=data,
    )


@functools.cache
def workitem_codes() -> dict[str, Code]:
    """Every Scheduled Workitem code the profiles know, by code value."""
    data = load_yaml("workitems.yaml")
    return {
        str(value): Code(str(value), data["scheme"], meaning)
        for value, meaning in data["codes"].items()
    }
