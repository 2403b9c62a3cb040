"""Keeps pynetdicom's association reactor from taking a response meant for a waiting send_*().

pynetdicom (3.0.4 and its main branch) runs two readers of one DIMSE message queue per
association: the reactor thread, which serves incoming requests, and the thread inside
``send_c_store()``/``send_n_set()``/..., which waits for its response. The reactor is
"paused" with an Event, but the handshake has a window: after one send_*() sets the Event
and the next one clears it again, the reactor may still be waking from the first, see
``_is_paused`` left True, and go on to pop the queue. If the peer answers inside that window
(a fast local SCP, a loaded machine), the reactor takes the response, logs "Received
unexpected C-STORE service message" and drops it; the sender waits for the DIMSE timeout
and the operation fails (pynetdicom issues #435 and #875). Measured here: 1 of 5000
back-to-back C-ECHOs against DCMTK storescp with both cores busy; once in CI, a C-STORE
to dcmqrscp.

The guard makes the reactor's non-blocking read leave a response at the head of the queue
while a send_*() has the reactor paused (its checkpoint cleared): that response can only
belong to the sender, which reads with ``block=True``. With no sender waiting, a response is
stale and is taken as before (pynetdicom logs and discards it). Requests are untouched.
"""

from __future__ import annotations

import contextlib

from pynetdicom.dimse import DIMSEServiceProvider

_original_get_msg = DIMSEServiceProvider.get_msg


def _is_response(item: tuple) -> bool:
    _context_id, msg = item
    return msg is not None and getattr(msg, "Status", None) is not None


def _guarded_get_msg(self: DIMSEServiceProvider, block: bool = False):
    if block:
        return _original_get_msg(self, block)
    queue = self.msg_queue
    # Under gevent (a Locust soak) the queue is gevent's, without a mutex: greenlets only
    # switch where they wait, so nothing can come between the peek and the pop below.
    mutex = getattr(queue, "mutex", None)
    with mutex if mutex is not None else contextlib.nullcontext():
        if not queue.queue:
            return None, None
        sender_waiting = not self.assoc._reactor_checkpoint.is_set()
        if sender_waiting and _is_response(queue.queue[0]):
            return None, None
        item = queue.queue.popleft()
        if mutex is not None:
            queue.not_full.notify()
        return item


def install() -> None:
    """Route every association's queue reads through the guard (idempotent)."""
    DIMSEServiceProvider.get_msg = _guarded_get_msg


def installed() -> bool:
    return DIMSEServiceProvider.get_msg is _guarded_get_msg
