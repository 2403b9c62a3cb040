"""A UPS SCU's exchanges (RO-17, 19, 21, 25, 26, UPS Watch, Request Cancel) on one association.

UPS Push, Pull and Watch are proposed. Every request names UPS Push as its Requested SOP
Class (PS3.4 CC.3.1: every UPS is a UPS Push instance) and travels on the context whose
class carries it (Tables CC.2-1 to CC.2-3, ``emulator.ups_services``): C-FIND, N-SET and
Change State on Pull, subscriptions on Watch, Request Cancel on Push or Watch, N-GET on
any. pynetdicom finds a context for Push by itself only for the final UIDs, so the chosen
context's UID is always passed as ``meta_uid``.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pynetdicom import build_context, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import N_SET_RQ
from pynetdicom.dimse_primitives import N_SET
from pynetdicom.dsutils import encode

from emulator import ups_services
from emulator.net.ae_factory import NetworkSettings, association_handlers, make_ae, tls_args
from emulator.net.peers import Peer
from emulator.net.scu import (
    AssociationFailed,
    AssociationRejected,
    DimseError,
    contexts_refused,
)
from emulator.profile import Profile

ACTION_CHANGE_STATE = 1
ACTION_REQUEST_CANCEL = 2


@dataclass(frozen=True)
class Reply:
    status: int
    dataset: Dataset | None
    comment: str = ""  # the response's Error Comment (0000,0902), if any


class UpsConnection:
    """One association with the TMS; use as a context manager."""

    def __init__(
        self, calling_ae: str, tms: Peer, profile: Profile, settings: NetworkSettings | None = None
    ) -> None:
        self.calling_ae = calling_ae
        self.tms = tms
        self.profile = profile
        self.settings = settings or NetworkSettings()
        self.push = profile.sop_classes["ups_push"]
        self.pull = profile.sop_classes["ups_pull"]
        self.watch = profile.sop_classes["ups_watch"]
        self.assoc: Association | None = None
        # True sends the legacy form (the context's own class as the Requested SOP Class),
        # only to test a TMS's answer to it; the standard's form is UPS Push.
        self.legacy_class = False

    def __enter__(self) -> UpsConnection:
        ae = make_ae(self.calling_ae, self.settings)
        # A TMS without UPS Push or UPS Watch as SCP rejects that context only, and the
        # association still serves what the others carry.
        ae.requested_contexts = [build_context(uid) for uid in (self.push, self.pull, self.watch)]
        self.assoc = ae.associate(
            self.tms.host,
            self.tms.port,
            ae_title=self.tms.ae_title,
            evt_handlers=association_handlers(self.settings),
            tls_args=tls_args(self.settings, self.tms.host),
        )
        if not self.assoc.is_established:
            if self.assoc.is_rejected:
                raise AssociationRejected.of(self.assoc, self.calling_ae, self.tms)
            raise AssociationFailed.of(self.assoc, self.tms, self.settings)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_open(self) -> bool:
        return self.assoc is not None and self.assoc.is_established

    def close(self) -> None:
        """Releases the association (A-RELEASE), if it is still established."""
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()

    def _established(self) -> Association:
        """The association, or DimseError once the TMS (or pynetdicom) has ended it: a
        reply it could not decode aborts it, and that must reach the caller as a DIMSE
        failure, not as pynetdicom's RuntimeError (tests/test_fuzz.py)."""
        if self.assoc is None or not self.assoc.is_established:
            raise DimseError(f"the association with TMS {self.tms} is no longer established")
        return self.assoc

    def _context(self, service: str, action_type: int | None = None) -> str:
        """The accepted context that carries ``service`` (Tables CC.2-1 to CC.2-5), or a
        DimseError naming what the TMS refused, in one sentence."""
        assoc = self._established()
        accepted = [str(cx.abstract_syntax) for cx in assoc.accepted_contexts]
        uid = ups_services.context_for(self.profile.sop_classes, service, action_type, accepted)
        if uid is not None:
            return uid
        classes = ups_services.classes_for(service, action_type)
        named = " or ".join(self.profile.sop_classes[c] for c in classes)
        refused = contexts_refused(assoc, self.tms, [self.profile.sop_classes[c] for c in classes])
        what = f"{service}" + (f" type {action_type}" if action_type else "")
        raise DimseError(
            (refused or f"TMS {self.tms} accepted no context for {what}")
            + f": {what} travels on {named} (PS3.4 Table CC.2-1..CC.2-3)",
            0x0122,
        )

    def _class(self, context: str) -> str:
        return context if self.legacy_class else self.push

    def _check(self, status: Dataset | None, what: str) -> int:
        if status is None or "Status" not in status:
            raise DimseError(f"{what}: no response from the TMS")
        return int(status.Status)

    def find(self, identifier: Dataset) -> list[Dataset]:
        found = []
        pull = self._context("C-FIND")
        for status, ident in self._established().send_c_find(identifier, pull):
            code = self._check(status, "UPS C-FIND")
            if code in (0xFF00, 0xFF01):
                found.append(ident)
            elif code == 0x0000:
                return found
            else:
                raise DimseError("UPS C-FIND failed", code)
        raise DimseError("UPS C-FIND ended without a final response")

    def change_state(
        self, uid: str, state: str, transaction_uid: str, extra: Dataset | None = None
    ) -> Reply:
        info = Dataset()
        info.ProcedureStepState = state
        info.TransactionUID = transaction_uid
        for element in extra or []:
            info[element.tag] = element
        context = self._context("N-ACTION", ACTION_CHANGE_STATE)
        status, reply = self._established().send_n_action(
            info, ACTION_CHANGE_STATE, self._class(context), uid, meta_uid=context
        )
        code = self._check(status, f"N-ACTION {state}")
        return Reply(code, reply, str(status.get("ErrorComment", "") or ""))

    def watch_action(
        self, uid: str, action_type: int, receiving_ae: str, deletion_lock: bool = False
    ) -> int:
        """UPS Watch N-ACTION (3 subscribe, 4 unsubscribe, 5 suspend global) on one UPS or a
        well-known global instance, with events to ``receiving_ae``."""
        context = self._context("N-ACTION", action_type)
        info = Dataset()
        info.ReceivingAE = receiving_ae
        if action_type == 3:
            info.DeletionLock = "TRUE" if deletion_lock else "FALSE"
        status, _ = self._established().send_n_action(
            info, action_type, self._class(context), uid, meta_uid=context
        )
        return self._check(status, f"UPS Watch N-ACTION {action_type}")

    def request_cancel(self, uid: str, info: Dataset) -> Reply:
        """N-ACTION Request Cancel (action type 2, PS3.4 CC.2.2): a request to the
        performer, through the TMS; the UPS stays as it is until the performer acts."""
        context = self._context("N-ACTION", ACTION_REQUEST_CANCEL)
        status, reply = self._established().send_n_action(
            info, ACTION_REQUEST_CANCEL, self._class(context), uid, meta_uid=context
        )
        code = self._check(status, "N-ACTION Request Cancel")
        return Reply(code, reply, str(status.get("ErrorComment", "") or ""))

    def n_set(self, uid: str, modifications: Dataset) -> int:
        return self.n_set_reply(uid, modifications).status

    def n_set_reply(self, uid: str, modifications: Dataset) -> Reply:
        """N-SET, with the TMS's Error Comment."""
        context = self._context("N-SET")
        status, _ = self._established().send_n_set(
            modifications, self._class(context), uid, meta_uid=context
        )
        code = self._check(status, "N-SET")
        return Reply(code, None, str(status.get("ErrorComment", "") or ""))

    def n_get(self, uid: str, keywords: list[str]) -> Reply:
        """N-GET of some attributes (e.g. the state), as a performer may after a failure."""
        tags = [tag_for_keyword(k) for k in keywords]
        context = self._context("N-GET")
        status, reply = self._established().send_n_get(
            tags, self._class(context), uid, meta_uid=context
        )
        return Reply(self._check(status, "N-GET"), reply, str(status.get("ErrorComment", "") or ""))

    def abort_during_n_set(self, uid: str, modifications: Dataset) -> None:
        """Sends the command of an N-SET, then aborts before its data set: a cut-off update.

        It goes through pynetdicom's DIMSE encoding, but only the first P-DATA leaves, so the
        TMS sees a request start and the association end with A-ABORT.
        """
        assoc = self.assoc
        pull = self._context("N-SET")
        context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == pull)
        syntax = context.transfer_syntax[0]
        request = N_SET()
        request.MessageID = 1
        request.RequestedSOPClassUID = self.push
        request.RequestedSOPInstanceUID = uid
        request.ModificationList = BytesIO(
            encode(modifications, syntax.is_implicit_VR, syntax.is_little_endian)
        )
        message = N_SET_RQ()
        message.primitive_to_message(request)
        fragments = list(message.encode_msg(context.context_id, assoc.acceptor.maximum_length))
        evt.trigger(assoc, evt.EVT_DIMSE_SENT, {"message": message})
        assoc.dul.send_pdu(fragments[0])
        assoc.abort()
