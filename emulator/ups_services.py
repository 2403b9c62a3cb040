"""Which UPS request travels on which presentation context, naming which SOP Class.

PS3.4 Tables CC.2-1 to CC.2-5 give each UPS SOP Class its DIMSE services (an N-ACTION by
its Action Type ID), and CC.3.1 makes every UPS an instance of UPS Push, so a request names
UPS Push as its Requested (or Affected) SOP Class whatever context carries it. Both live
in ``profiles/ups.yaml``; the reference TMS refuses by them, every SCU of the product picks
its context by them, and the conformance suite judges a TMS by them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from emulator.profile import SopClasses, load_yaml

UPS_CLASSES = ("ups_push", "ups_pull", "ups_watch", "ups_event", "ups_query")


@functools.cache
def _table() -> dict:
    data = load_yaml("ups.yaml")
    return {"groups": data["dimse_service_groups"], "class_rule": data["requested_sop_class"]}


@dataclass(frozen=True)
class Refusal:
    """Why an SCP refuses a request, as its status and Error Comment."""

    status: int
    comment: str


def carries(class_name: str, service: str, action_type: int | None = None) -> bool:
    """Whether the UPS SOP Class ``class_name`` (e.g. ``ups_watch``) has ``service``
    (``N-ACTION`` with ``action_type``, ``N-SET``, ...) in its DIMSE service group."""
    group = _table()["groups"].get(class_name)
    if group is None or service not in group["services"]:
        return False
    return service != "N-ACTION" or int(action_type or 0) in group["actions"]


def refusal(
    uids: SopClasses,
    context_uid: str,
    requested_uid: str,
    service: str,
    action_type: int | None = None,
) -> Refusal | None:
    """The SCP's answer to a UPS request on a context of ``context_uid`` naming
    ``requested_uid``, when it must refuse it (None: it may proceed).

    The Requested SOP Class must be UPS Push (CC.3.1) or the context's own class (the form
    some trial implementations send, which the reference TMS also takes); the service must
    be one of the context's class (Tables CC.2-1 to CC.2-5).
    """
    groups, rule = _table()["groups"], _table()["class_rule"]
    context_class = uids.name_of(str(context_uid)) or ""
    push = uids[rule["required"]]
    if str(requested_uid) not in (push, str(context_uid)):
        return Refusal(
            int(rule["wrong_class"]),
            f"Requested SOP Class must be UPS Push (PS3.4 {rule['reference'][5:]})",
        )
    if carries(context_class, service, action_type):
        return None
    named = f"{service} {action_type}" if service == "N-ACTION" else service
    status = groups["no_such_action"] if service == "N-ACTION" else groups["unrecognized_operation"]
    group = groups.get(context_class)
    where = f"a {group['name']} service (PS3.4 Table {group['table']})" if group else "UPS"
    return Refusal(int(status), f"{named} is not {where}")


def is_standard_form(uids: SopClasses, requested_uid: str) -> bool:
    """Whether a request names UPS Push, as CC.3.1 requires."""
    return str(requested_uid) == uids[_table()["class_rule"]["required"]]


def context_for(
    uids: SopClasses, service: str, action_type: int | None, accepted: Iterable[str]
) -> str | None:
    """The abstract syntax, among the ``accepted`` ones, that carries the request: the
    first UPS class whose service group has it, in the table's order (Push, Pull, Watch,
    Event, Query); None when no accepted context can."""
    accepted = {str(uid) for uid in accepted}
    for name in UPS_CLASSES:
        uid = uids.uids.get(name)
        if uid in accepted and carries(name, service, action_type):
            return uid
    return None


def classes_for(service: str, action_type: int | None = None) -> list[str]:
    """The UPS SOP Class names that carry a request, in the table's order."""
    return [name for name in UPS_CLASSES if carries(name, service, action_type)]
