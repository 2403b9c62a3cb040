"""Study Root C-FIND matching and C-MOVE selection over the object store's index.

Matching follows PS3.4 C.2.2.2: single value, universal (empty), wildcard (* and ?),
UID list and date/time range matching. Queries are answered relationally: a key from a
level above the Query/Retrieve Level narrows the match, so RO-18 can move one plan by its
SOP Instance UID alone. A key from *below* the level is refused (A900), which is what a
strict hierarchical SCP must do.
"""

from __future__ import annotations

from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from emulator.reference.matching import (
    UnreadableIdentifier,
    condition,
    element_text,
    ensure_readable,
)
from emulator.store import INDEXED_KEYWORDS, ObjectStore, StoredInstance

LEVELS = ("STUDY", "SERIES", "IMAGE")
LEVEL_KEY = {
    "STUDY": "study_instance_uid",
    "SERIES": "series_instance_uid",
    "IMAGE": "sop_instance_uid",
}
# Keys the SCP computes rather than reads; the level each belongs to.
COMPUTED_KEYS = {
    "ModalitiesInStudy": "STUDY",
    "SOPClassesInStudy": "STUDY",
    "NumberOfStudyRelatedSeries": "STUDY",
    "NumberOfStudyRelatedInstances": "STUDY",
    "NumberOfSeriesRelatedInstances": "SERIES",
}
# Keys that may appear at any level without being matching keys.
NEUTRAL_KEYS = {
    "QueryRetrieveLevel",
    "SpecificCharacterSet",
    "RetrieveAETitle",
    "TimezoneOffsetFromUTC",
}


class QueryError(Exception):
    """The identifier is not a valid Study Root identifier; answer with ``status``."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]


STATUS_IDENTIFIER_MISMATCH = 0xA900


@dataclass(frozen=True)
class ParsedQuery:
    level: str
    where: str
    params: list[str]
    requested: list[str]


def parse_identifier(identifier: Dataset) -> ParsedQuery:
    """Turns a Study Root identifier into an SQL condition and the keys to return."""
    try:
        ensure_readable(identifier)
    except UnreadableIdentifier as exc:
        raise QueryError(STATUS_IDENTIFIER_MISMATCH, str(exc)) from exc
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise QueryError(STATUS_IDENTIFIER_MISMATCH, f"bad QueryRetrieveLevel {level!r}")
    depth = LEVELS.index(level)
    parts: list[str] = []
    params: list[str] = []
    requested: list[str] = []
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in NEUTRAL_KEYS:
            continue
        key_level = (INDEXED_KEYWORDS.get(keyword) or (None, None, None))[2] or COMPUTED_KEYS.get(
            keyword
        )
        if key_level and LEVELS.index(key_level) > depth:
            raise QueryError(STATUS_IDENTIFIER_MISMATCH, f"{keyword} is below level {level}")
        requested.append(keyword)
        if keyword not in INDEXED_KEYWORDS or element.VR == "SQ":
            continue
        value = element_text(element)
        if not value or value == "*":
            continue
        column, vr, _ = INDEXED_KEYWORDS[keyword]
        sql, values = condition(column, vr, value)
        parts.append(f"({sql})")
        params.extend(values)
    return ParsedQuery(level, " AND ".join(parts), params, requested)


class StudyRootQuery:
    """Answers C-FIND and selects C-MOVE instances from an :class:`ObjectStore`."""

    def __init__(self, store: ObjectStore, retrieve_ae_title: str) -> None:
        self.store = store
        self.retrieve_ae_title = retrieve_ae_title

    def instances(self, identifier: Dataset) -> list[StoredInstance]:
        """Every instance under the matching entities: what a C-MOVE sends."""
        query = parse_identifier(identifier)
        return self.store.select(query.where, query.params)

    def find(self, identifier: Dataset) -> Iterator[Dataset]:
        """One response identifier per matching entity at the query level."""
        query = parse_identifier(identifier)
        groups: dict[str, list[StoredInstance]] = {}
        for instance in self.store.select(query.where, query.params):
            groups.setdefault(instance.values[LEVEL_KEY[query.level]], []).append(instance)
        for members in groups.values():
            yield self._response(query, identifier, members)

    def _entity_members(self, level: str, key: str) -> list[StoredInstance]:
        return self.store.select(f"{LEVEL_KEY[level]} = ?", (key,))

    def _response(
        self, query: ParsedQuery, identifier: Dataset, members: list[StoredInstance]
    ) -> Dataset:
        first = members[0]
        # Counts describe the whole entity, not only the members that matched.
        entity = self._entity_members(query.level, first.values[LEVEL_KEY[query.level]])
        header: Dataset | None = None
        rsp = Dataset()
        if "SpecificCharacterSet" in identifier:
            rsp.SpecificCharacterSet = "ISO_IR 100"
        rsp.QueryRetrieveLevel = query.level
        rsp.RetrieveAETitle = self.retrieve_ae_title
        for keyword in query.requested:
            if keyword in INDEXED_KEYWORDS:
                setattr(rsp, keyword, first.values[INDEXED_KEYWORDS[keyword][0]])
            elif keyword == "ModalitiesInStudy":
                rsp.ModalitiesInStudy = sorted({m.values["modality"] for m in entity})
            elif keyword == "SOPClassesInStudy":
                rsp.SOPClassesInStudy = sorted({m.sop_class_uid for m in entity})
            elif keyword == "NumberOfStudyRelatedSeries":
                rsp.NumberOfStudyRelatedSeries = len(
                    {m.values["series_instance_uid"] for m in entity}
                )
            elif keyword in ("NumberOfStudyRelatedInstances", "NumberOfSeriesRelatedInstances"):
                setattr(rsp, keyword, len(entity))
            else:
                if header is None:
                    header = self.store.read(first, stop_before_pixels=True)
                tag = Tag(keyword)
                if tag in header:
                    rsp[tag] = deepcopy(header[tag])
                else:
                    # Unknown to this object: return the key empty, as PS3.4 C.4.1.1.3.2 asks.
                    element = deepcopy(identifier[tag])
                    element.value = [] if element.VR == "SQ" else None
                    rsp[tag] = element
        return rsp
