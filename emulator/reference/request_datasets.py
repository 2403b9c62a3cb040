"""The data set of an N-CREATE, N-SET or N-ACTION request, decoded and checked whole.

A request's data set is refused with a PS3.7 failure status and an Error Comment naming
the element, before anything is stored: an element of the command group (0000) or the
file meta group (0002), an attribute no dictionary knows, a private attribute, a VR that
is not the attribute's, a value its VR does not allow, or bytes that do not decode. Left
to pydicom, each of these raised inside the handler and pynetdicom answered 0x0110
("Processing failure") with no word of why.
"""

from __future__ import annotations

from collections.abc import Callable

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

NO_SUCH_ATTRIBUTE = 0x0105  # PS3.7 C.4: the Tag specified was not recognized
INVALID_ATTRIBUTE_VALUE = 0x0106  # PS3.7 C.4: the attribute value specified was out of range
NOT_IN_A_DATA_SET = {0x0000: "the command group", 0x0002: "the file meta group"}
MAX_DEPTH = 8  # sequences nested deeper than any UPS attribute are refused


class RequestDatasetError(ValueError):
    """A request data set the SCP refuses: ``status`` and an Error Comment (``str()``)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def decode(read: Callable[[], Dataset | None]) -> Dataset:
    """The data set ``read`` decodes (pynetdicom's lazy ``event.modification_list`` and
    the like), checked whole; an absent data set is an empty one."""
    try:
        ds = read()
    except Exception as exc:  # pydicom raises many types for bytes it cannot decode
        raise RequestDatasetError(
            INVALID_ATTRIBUTE_VALUE, f"data set does not decode: {exc}"
        ) from exc
    ds = ds if ds is not None else Dataset()
    check(ds)
    return ds


def check(ds: Dataset, depth: int = 0, path: str = "") -> None:
    """Raises :class:`RequestDatasetError` for the first element the SCP cannot take."""
    if depth > MAX_DEPTH:
        raise RequestDatasetError(INVALID_ATTRIBUTE_VALUE, f"{path} nested too deep")
    for tag in list(ds.keys()):
        tag = int(tag)
        name = keyword_for_tag(tag) or _tag_text(tag)
        where = f"{path}>{name}" if path else name
        group, number = tag >> 16, tag & 0xFFFF
        if group in NOT_IN_A_DATA_SET:
            raise RequestDatasetError(
                NO_SUCH_ATTRIBUTE,
                f"{_tag_text(tag)} belongs to {NOT_IN_A_DATA_SET[group]}, not a data set",
            )
        if group % 2:
            raise RequestDatasetError(
                NO_SUCH_ATTRIBUTE, f"private attribute {_tag_text(tag)} is not supported"
            )
        if number == 0:
            raise RequestDatasetError(
                NO_SUCH_ATTRIBUTE, f"group length {_tag_text(tag)} is retired (PS3.5 7.2)"
            )
        try:
            expected = dictionary_VR(tag)
        except KeyError:
            raise RequestDatasetError(
                NO_SUCH_ATTRIBUTE, f"{_tag_text(tag)} is not a DICOM attribute"
            ) from None
        try:
            element = ds[tag]
        except Exception as exc:
            raise RequestDatasetError(
                INVALID_ATTRIBUTE_VALUE, f"{where} does not decode: {exc}"
            ) from exc
        if " or " not in expected and expected != element.VR and element.VR != "UN":
            raise RequestDatasetError(
                INVALID_ATTRIBUTE_VALUE, f"{where} must be {expected}, not {element.VR}"
            )
        if element.VR == "SQ":
            for item in element.value or []:
                check(item, depth + 1, where)
            continue
        _check_value(where, element.VR, element.value, element.VM)


def _check_value(where: str, vr: str, value: object, vm: int) -> None:
    if value in (None, "") or isinstance(value, bytes):
        return
    values = value if vm > 1 else [value]
    for single in values:
        try:
            validate_value(vr, str(single), pydicom_config.RAISE)
        except ValueError as exc:
            raise RequestDatasetError(
                INVALID_ATTRIBUTE_VALUE, f"invalid {where}: {str(exc)[:80]}"
            ) from exc
