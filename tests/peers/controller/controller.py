"""The independent controller: a simulated C-arm linac, 6-DOF couch and CBCT imager that
speaks protocol version 2 (hil/PROTOCOL.md) to one host at a time."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import machine
from .framing import PROTOCOL_VERSION, Frame, is_finite_number
from .imaging import Anatomy, CbctGeometry, acquire, images_bodies
from .link import FdTransport, Link, TcpTransport
from .machine import COUCH_AXES, ROTATION_AXES, TRANSLATION_AXES, Axes, Dosimetry

DEFAULT_IDENTITY = {
    "vendor": "Independent Linac Works",
    "model": "IC-2 C-arm",
    "serial": "ILW-0002",
    "firmware": "2.0.0-independent",
}

DEFAULT_CAPABILITIES: dict[str, Any] = {
    "energies_mv": [6, 10, 15],
    "min_dose_rate": 100,
    "max_dose_rate": 1400,
    "mlc_leaf_pairs": 60,
    "max_beams": 20,
    "patient_positions": ["HFS", "FFS", "HFP", "FFP"],
    "gantry_speed_deg_s": 6.0,
    "couch_speed_mm_s": 20.0,
    "couch_limits_mm": 50.0,
    "couch_rotation_limits_deg": 3.0,
    "couch_tolerance_mm": 1.0,
    "couch_tolerance_deg": 0.5,
    "couch_retries": 1,
    "meterset_tolerance_mu": 1.0,
}

# machine figures, in machine seconds (multiplied by time_scale on the wall clock)
TICK_S = 0.2
PROGRESS_INTERVAL_S = 1.0
BEAM_ON_DELAY_S = 0.5
CBCT_S = 60.0
COUCH_ROTATION_SPEED_DEG_S = 1.0
LEAF_SPEED_MM_S = 25.0
# link figures, wall clock (not scaled)
HOST_SILENCE_S = 2.0
# the figures that bind the host, stated too (PROTOCOL.md, Timing: the controller states
# every figure); wall clock, the document's defaults
HOST_TIMING = {"silence_s": 5.0, "heartbeat_s": 0.5, "hello_s": 5.0, "reconnect_s": 10.0}
# BEAM_STARTED goes at once (the first METERSET later) when the ramp-up would take more
# than this share of silence_s
RAMP_SHARE_OF_SILENCE = 0.5
# PROGRESS and METERSET go out at this share of the announced interval (jitter margin),
# and the announced intervals have floors (a fast time scale would otherwise announce a few
# milliseconds, which no thread scheduler keeps)
SEND_MARGIN = 0.5
MIN_TICK_S = 0.05
MIN_PROGRESS_S = 0.1

SETUP_TRANSLATION_MM = (3.0, -2.0, 1.5)
SETUP_ROTATION_DEG = (0.8, -0.6, 1.2)

INTERLOCK_REASONS = {
    "DOSE1": "primary dosimetry channel interlock",
    "DOSE2": "secondary dosimetry channel disagreement",
    "MLC": "MLC position interlock",
    "GANTRY": "gantry position interlock",
    "DOOR": "treatment room door opened",
}

_SHORT_AXIS_NAMES = {name.rsplit("_", 1)[0]: name for name in COUCH_AXES}


@dataclass
class DeliveryRecord:
    """One beam-on as the machine measured it (ground truth for tests)."""

    beam: int
    start: float
    end: float
    measured: float
    termination: str = ""  # "" while the beam is on
    code: str = ""
    reason: str = ""
    started_at: float = 0.0  # time.time() of its BEAM_ON
    ended_at: float | None = None  # time.time() when the beam stopped

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ProtocolRefusal(Exception):
    """A request answered with ERROR."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class _Operation:
    """A long operation (LOAD_BEAM, MOVE_COUCH, ACQUIRE) running apart from frame handling."""

    def __init__(
        self,
        name: str,
        duration_wall: float,
        token: int,
        apply: Callable[[float], None],
        finish: Callable[[], list[tuple[str, dict[str, Any]]]],
        prepare: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.start = time.monotonic()
        self.duration = max(0.0, duration_wall)
        self.end = self.start + self.duration
        self.token = token
        self.apply = apply
        self.finish = finish
        self.cancel = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        if prepare is None:
            self.ready.set()
        else:

            def run() -> None:
                try:
                    prepare()
                except BaseException as exc:  # reported as the operation's failure
                    self.error = exc
                finally:
                    self.ready.set()

            threading.Thread(target=run, name=f"{name}-prepare", daemon=True).start()

    def fraction(self, now: float) -> float:
        if self.duration <= 0:
            return 1.0
        return min(1.0, max(0.0, (now - self.start) / self.duration))


class _Beam:
    def __init__(self, program: dict[str, Any], dosimetry: Dosimetry, token: int, record):
        self.program = program
        self.dosimetry = dosimetry
        self.token = token
        self.record: DeliveryRecord = record
        self.on_at = time.monotonic()
        self.radiation_at: float | None = None
        self.started_sent = False
        self.stop = threading.Event()
        self.last_rate_m = dosimetry.m
        self.last_rate_t = 0.0
        self.pending: list[dict[str, Any]] = []


class IndependentController:
    """See the package docstring for the public API."""

    def __init__(
        self,
        time_scale: float = 1.0,
        patient_position: str = "HFS",
        anatomy: Any = None,
        identity: dict[str, str] | None = None,
        capabilities: dict[str, Any] | None = None,
        timing: dict[str, Any] | None = None,
        *,
        isocenter: Any = None,
        cbct_geometry: CbctGeometry | None = None,
        max_planes_per_frame: int | None = None,
        setup_translation_mm=SETUP_TRANSLATION_MM,
        setup_rotation_deg=SETUP_ROTATION_DEG,
        seed: int = 20240,
    ) -> None:
        if not time_scale > 0:
            raise ValueError("time_scale must be positive")
        self.time_scale = float(time_scale)
        self.identity = {**DEFAULT_IDENTITY, **(identity or {})}
        self.capabilities = {**DEFAULT_CAPABILITIES, **(capabilities or {})}
        if patient_position not in machine.IEC_TO_LPS:
            raise ValueError(f"patient position {patient_position!r} is not HFS, HFP, FFS or FFP")
        self.patient_position = patient_position
        self.timing = self._timing(timing or {})
        self._progress_period = SEND_MARGIN * float(self.timing["progress_interval_s"])
        self._tick_period = SEND_MARGIN * float(self.timing["tick_s"])
        self.cbct_geometry = cbct_geometry or CbctGeometry()
        self.max_planes_per_frame = max_planes_per_frame
        self.setup_translation = np.asarray(setup_translation_mm, dtype=float)
        self.setup_rotation = machine.extrinsic_xyz(*(float(v) for v in setup_rotation_deg))
        self._anatomy = self._load_anatomy(anatomy, isocenter)
        self._seed = int(seed)
        self._rng = np.random.default_rng(self._seed)
        self._acquisitions = 0
        self.last_cbct: np.ndarray | None = None

        self._lock = threading.RLock()
        pairs = int(self.capabilities["mlc_leaf_pairs"])
        self._axes = Axes(mlc=[0.0] * (2 * pairs))
        self._couch = dict.fromkeys(COUCH_AXES, 0.0)
        # the table top's rigid motion since power-up (IEC axes): every move composed
        self._table: tuple[np.ndarray, np.ndarray] = (np.eye(3), np.zeros(3))
        self._loaded: dict[str, Any] | None = None
        self._op: _Operation | None = None
        self._beam: _Beam | None = None
        self._records: list[DeliveryRecord] = []
        self._sessions = 0
        self._token = 0
        self._link: Link | None = None
        self._links_served = 0
        self.traffic: list[tuple[float, str, str, dict[str, Any]]] = []

        # fault knobs
        self._trips: dict[int, tuple[float, str, str]] = {}
        self._stall_until = 0.0
        self._line_down_until = 0.0
        self._short: dict[str, list[Any]] = {}
        self._overrun = 0.0
        self._cp_from_zero = False
        self._swap_long_vert = False

        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._pty: tuple[int, int] | None = None
        self._pty_link: Link | None = None

    # ---------------------------------------------------------------- configuration --

    def _timing(self, overrides: dict[str, Any]) -> dict[str, Any]:
        s = self.time_scale
        gantry = float(self.capabilities["gantry_speed_deg_s"])
        couch_speed = float(self.capabilities["couch_speed_mm_s"])
        worst_load = 180.0 / gantry
        worst_move = max(
            float(self.capabilities["couch_limits_mm"]) / couch_speed,
            float(self.capabilities["couch_rotation_limits_deg"]) / COUCH_ROTATION_SPEED_DEG_S,
        )
        timing: dict[str, Any] = {
            "progress_interval_s": round(max(PROGRESS_INTERVAL_S * s, MIN_PROGRESS_S), 4),
            "tick_s": round(max(TICK_S * s, MIN_TICK_S), 4),
            **HOST_TIMING,
            "max_s": {
                "LOAD_BEAM": round(2 * worst_load * s + 5.0, 3),
                "MOVE_COUCH": round(2 * worst_move * s + 5.0, 3),
                "ACQUIRE": round(2 * CBCT_S * s + 5.0, 3),
            },
        }
        for key, value in overrides.items():
            if key == "max_s" and isinstance(value, dict):
                timing["max_s"] = {**timing["max_s"], **value}
            else:
                timing[key] = value
        return timing

    @staticmethod
    def _load_anatomy(anatomy: Any, isocenter: Any) -> Anatomy:
        if anatomy is None:
            result = Anatomy.phantom()
        elif isinstance(anatomy, Anatomy):
            result = anatomy
        elif isinstance(anatomy, str | os.PathLike):
            return Anatomy.from_dicom_dir(Path(anatomy), isocenter)
        else:
            volume, origin, spacing = anatomy
            return Anatomy.from_array(volume, origin, spacing, isocenter)
        if isocenter is not None:
            result.set_isocenter(isocenter)
        return result

    # ------------------------------------------------------------------- serving --

    def serve_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on host:port (0: a free port); one host connection at a time."""
        if self._listener is not None or self._pty is not None:
            raise RuntimeError("the controller already serves a line")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(4)
        listener.settimeout(0.1)
        self._listener = listener
        thread = threading.Thread(target=self._accept_loop, name="ctrl-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        bound = listener.getsockname()
        return bound[0], bound[1]

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if time.monotonic() < self._line_down_until:
                with contextlib.suppress(OSError):
                    conn.close()
                continue
            link = self._make_link(TcpTransport(conn), f"tcp{self._links_served}")
            with self._lock:
                self._links_served += 1
                self._link = link
            link.start()
            while not self._stopped.is_set() and not link.closed.wait(0.1):
                pass
            with self._lock:
                if self._link is link:
                    self._end_session("the connection closed")
                    self._link = None
            link.close()

    def serve_pty(self) -> str:
        """A pty pair; the master is served, the slave's path returned for the host."""
        if self._listener is not None or self._pty is not None:
            raise RuntimeError("the controller already serves a line")
        master, slave = os.openpty()
        tty.setraw(slave)
        self._pty = (master, slave)
        link = self._make_link(FdTransport(master), "pty")
        self._pty_link = link
        with self._lock:
            self._link = link
        link.start()
        return os.ttyname(slave)

    def _make_link(self, transport, name: str) -> Link:
        holder: dict[str, Link] = {}

        def on_frame(frame: Frame) -> None:
            self._on_frame(holder["link"], frame)

        def on_lost(reason: str) -> None:
            self._on_lost(holder["link"], reason)

        def on_reset() -> None:
            with self._lock:
                if self._link is holder["link"]:
                    self._end_session("a HELLO started a new session")

        link = Link(
            transport,
            on_frame=on_frame,
            on_lost=on_lost,
            on_session_reset=on_reset,
            gate=self._gate,
            name=name,
        )
        holder["link"] = link
        return link

    def _gate(self) -> bool:
        now = time.monotonic()
        return now >= self._stall_until and now >= self._line_down_until

    def stop(self) -> None:
        """Power off: close the line, stop every thread."""
        self._stopped.set()
        with self._lock:
            self._end_session("the controller stopped")
            link = self._link
            self._link = None
        if link is not None:
            link.close()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        if self._pty is not None:
            for fd in self._pty:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for thread in self._threads:
            thread.join(timeout=2.0)

    def __enter__(self) -> IndependentController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ ground truth --

    @property
    def sessions(self) -> int:
        """HELLOs answered (HELLO_REPLY, or ERROR) since power-up, retransmitted ones too."""
        with self._lock:
            return self._sessions

    @property
    def deliveries(self) -> list[DeliveryRecord]:
        """Every beam-on, in order (copies)."""
        with self._lock:
            self._advance_beam_locked(time.monotonic(), send=False)
            return [DeliveryRecord(**r.as_dict()) for r in self._records]

    @property
    def last_delivery(self) -> dict[str, Any] | None:
        with self._lock:
            self._advance_beam_locked(time.monotonic(), send=False)
            return self._last_delivery_body()

    def couch_position(self) -> dict[str, float]:
        """The six table-top values (IEC 61217), as the encoders read now."""
        with self._lock:
            self._apply_motion(time.monotonic())
            return {k: round(v, 3) for k, v in self._couch.items()}

    def machine_state(self) -> dict[str, Any]:
        """The STATE body, now."""
        with self._lock:
            return self._state_body()

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._link is not None and not self._link.closed.is_set()

    @property
    def anatomy(self) -> Anatomy:
        return self._anatomy

    # ----------------------------------------------------------------- fault knobs --

    def trip_interlock(
        self, beam: int, meterset: float, code: str = "DOOR", reason: str | None = None
    ) -> None:
        """The next beam-on of ``beam`` that passes ``meterset`` MU stops MACHINE, ``code``."""
        if code not in INTERLOCK_REASONS:
            raise ValueError(f"interlock code {code!r} is not one of {sorted(INTERLOCK_REASONS)}")
        with self._lock:
            self._trips[int(beam)] = (float(meterset), code, reason or INTERLOCK_REASONS[code])
            if self._beam is not None and self._beam.record.beam == int(beam):
                d = self._beam.dosimetry
                if float(meterset) < d.end_target:
                    d.trip = self._trips.pop(int(beam))

    def drop_link(self, down_s: float = 1.0) -> None:
        """Cut the line: the connection closes at once (a pty goes dead) for ``down_s``."""
        with self._lock:
            self._line_down_until = time.monotonic() + max(0.0, down_s)
            link = self._link
        if link is not None:
            self._on_lost(link, "the link was cut", abort=True)

    def stall(self, seconds: float) -> None:
        """Answer nothing and ACK nothing for ``seconds`` (the machine keeps running)."""
        self._stall_until = time.monotonic() + max(0.0, seconds)

    def couch_stops_short(self, axis: str, mm: float, moves: int | None = None) -> None:
        """The next ``moves`` moves (None: every move until cleared) that move ``axis`` stop
        ``mm`` (degrees for a rotation) short of the asked motion in it; 0 clears."""
        name = axis if axis in COUCH_AXES else _SHORT_AXIS_NAMES.get(axis)
        if name is None:
            raise ValueError(f"unknown couch axis {axis!r}")
        with self._lock:
            if mm == 0:
                self._short.pop(name, None)
            else:
                self._short[name] = [abs(float(mm)), moves]

    def overrun(self, mu: float) -> None:
        """Every beam delivers ``mu`` MU past its end before it stops (NORMAL)."""
        with self._lock:
            self._overrun = max(0.0, float(mu))

    def cp_index_from_zero(self, enabled: bool = True) -> None:
        """Non-conformant: CONTROL_POINT index i-1 for control point i."""
        with self._lock:
            self._cp_from_zero = bool(enabled)

    def swap_long_vert(self, enabled: bool = True) -> None:
        """Non-conformant: the longitudinal motor moves by the vertical request and back."""
        with self._lock:
            self._swap_long_vert = bool(enabled)

    def clear_faults(self) -> None:
        with self._lock:
            self._trips.clear()
            self._short.clear()
            self._overrun = 0.0
            self._cp_from_zero = False
            self._swap_long_vert = False
            self._stall_until = 0.0
            self._line_down_until = 0.0

    # ------------------------------------------------------------------ sessions --

    def _send(self, token: int, name: str, body: dict[str, Any], coalesce: bool = False) -> None:
        """Queue a frame for the session ``token``; dropped if that session is over."""
        with self._lock:
            link = self._link
            if token != self._token or link is None:
                return
            self.traffic.append((time.monotonic(), "sent", name, body))
            link.send(name, body, coalesce=coalesce)

    def _end_session(self, reason: str) -> None:
        """The session is over: a beam still on stops (MACHINE, LINK), a long operation is
        abandoned where its axes are, the loaded beam is unloaded.  Holds the lock."""
        with self._lock:
            self._token += 1
            now = time.monotonic()
            if self._beam is not None:
                self._advance_beam_locked(now, send=False)
                if self._beam is not None:
                    self._finish_beam_locked("MACHINE", "LINK", reason, send=False)
            if self._op is not None:
                op = self._op
                op.apply(op.fraction(now))
                op.cancel.set()
                self._op = None
            self._loaded = None

    def _on_lost(self, link: Link, reason: str, abort: bool = False) -> None:
        with self._lock:
            if link is not self._link:
                return
            self._end_session(f"host lost: {reason}")
            if link is self._pty_link:
                link.reset()
                link.flush_input()
                return
            self._link = None
        link.close(abort=abort)

    # ------------------------------------------------------------- frame handling --

    def _on_frame(self, link: Link, frame: Frame) -> None:
        with self._lock:
            if link is not self._link:
                return
            self.traffic.append((time.monotonic(), "received", frame.name, frame.body))
            handler = {
                "HELLO": self._hello,
                "LOAD_BEAM": self._load_beam,
                "BEAM_ON": self._beam_on,
                "INTERRUPT": self._interrupt,
                "MOVE_COUCH": self._move_couch,
                "ACQUIRE": self._acquire,
                "GET_STATE": self._get_state,
                "HEARTBEAT": self._heartbeat,
            }.get(frame.name)
            try:
                if handler is None:
                    raise ProtocolRefusal(
                        "BAD_REQUEST", f"{frame.name} is not a request a controller takes"
                    )
                handler(frame.body)
            except ProtocolRefusal as refusal:
                self._send(
                    self._token,
                    "ERROR",
                    {"code": refusal.code, "text": refusal.text, "request": frame.name},
                )

    def _busy(self) -> str:
        if self._op is not None:
            return f"{self._op.name} is running"
        if self._beam is not None:
            return "a beam is on"
        return ""

    def _hello(self, body: dict[str, Any]) -> None:
        self._end_session("a HELLO started a new session")
        # every HELLO answered counts, with HELLO_REPLY or with ERROR (which answers it)
        self._sessions += 1
        protocol = body.get("protocol")
        if not isinstance(protocol, int) or isinstance(protocol, bool):
            raise ProtocolRefusal("BAD_REQUEST", "HELLO needs an integer protocol")
        if protocol != PROTOCOL_VERSION:
            raise ProtocolRefusal(
                "UNSUPPORTED",
                f"this controller speaks protocol {PROTOCOL_VERSION}, not {protocol}",
            )
        self._send(
            self._token,
            "HELLO_REPLY",
            {
                "protocol": PROTOCOL_VERSION,
                "identity": dict(self.identity),
                "capabilities": dict(self.capabilities),
                "timing": dict(self.timing),
                "last_delivery": self._last_delivery_body(),
                "couch": self._couch_body(),
            },
        )

    def _get_state(self, body: dict[str, Any]) -> None:
        self._send(self._token, "STATE", self._state_body())

    def _heartbeat(self, body: dict[str, Any]) -> None:
        state = "beam_on" if self._beam is not None else ("busy" if self._op else "idle")
        self._send(self._token, "HEARTBEAT_REPLY", {"state": state, "sessions": self._sessions})

    def _interrupt(self, body: dict[str, Any]) -> None:
        # A hold is never refused: a body without a usable reason still holds the beam.
        reason = body.get("reason")
        reason = reason if isinstance(reason, str) else ""
        if self._beam is None:
            return
        now = time.monotonic()
        self._advance_beam_locked(now, send=True)
        if self._beam is not None:
            self._finish_beam_locked("OPERATOR", "", reason, send=True)

    # ------------------------------------------------------------------ bodies --

    def _couch_body(self) -> dict[str, float]:
        self._apply_motion(time.monotonic())
        return {k: round(v, 3) for k, v in self._couch.items()}

    def _state_body(self) -> dict[str, Any]:
        now = time.monotonic()
        self._apply_motion(now)
        self._advance_beam_locked(now, send=False)
        axes = self._beam.dosimetry.axes if self._beam is not None else self._axes
        return {
            "gantry_angle": round(axes.gantry % 360.0, 2),
            "collimator_angle": round(axes.collimator % 360.0, 2),
            "jaws": [round(v, 2) for v in axes.jaws],
            "mlc": [round(v, 2) for v in axes.mlc],
            "couch": {k: round(v, 3) for k, v in self._couch.items()},
            "beam_on": self._beam is not None,
            "busy": self._op.name if self._op is not None else "",
        }

    def _last_delivery_body(self) -> dict[str, Any] | None:
        if not self._records:
            return None
        r = self._records[-1]
        return {
            "beam": r.beam,
            "start": r.start,
            "measured": r.measured,
            "termination": r.termination,
            "code": r.code,
            "reason": r.reason,
        }

    def _apply_motion(self, now: float) -> None:
        if self._op is not None:
            self._op.apply(self._op.fraction(now))

    # --------------------------------------------------------- long operations --

    def _start_operation(self, op: _Operation) -> None:
        self._op = op
        thread = threading.Thread(target=self._run_operation, args=(op,), daemon=True)
        thread.name = f"ctrl-{op.name}"
        thread.start()

    def _run_operation(self, op: _Operation) -> None:
        next_progress = op.start + self._progress_period
        while True:
            now = time.monotonic()
            if now < op.end:
                wake = min(op.end, next_progress)
            elif op.ready.is_set():
                wake = now
            else:
                wake = min(next_progress, now + 0.01)
            if op.cancel.wait(max(0.0, wake - now)):
                return
            with self._lock:
                if self._op is not op:
                    return
                now = time.monotonic()
                op.apply(op.fraction(now))
                if now >= op.end and op.ready.is_set():
                    self._op = None
                    if op.error is not None:
                        self._send(
                            op.token,
                            "ERROR",
                            {"code": "LIMIT", "text": f"failed: {op.error}", "request": op.name},
                        )
                        return
                    for name, body in op.finish():
                        self._send(op.token, name, body)
                    return
                if now >= next_progress:
                    self._send(
                        op.token,
                        "PROGRESS",
                        {
                            "operation": op.name,
                            "elapsed_s": round(now - op.start, 3),
                            "done": round(op.fraction(now), 3),
                        },
                    )
                    next_progress += self._progress_period
                    if next_progress <= now:
                        next_progress = now + self._progress_period

    # LOAD_BEAM ---------------------------------------------------------------------

    def _validate_program(self, body: dict[str, Any]) -> dict[str, Any]:
        def bad(text: str) -> ProtocolRefusal:
            return ProtocolRefusal("BAD_REQUEST", text)

        def number(value: Any, name: str, minimum: float | None = None) -> float:
            if not is_finite_number(value):
                raise bad(f"{name} must be a number")
            if minimum is not None and value < minimum:
                raise bad(f"{name} must be at least {minimum}")
            return float(value)

        for key in (
            "beam_number",
            "name",
            "energy_mv",
            "dose_rate",
            "total_meterset",
            "start_meterset",
            "end_meterset",
            "control_points",
        ):
            if key not in body:
                raise bad(f"LOAD_BEAM needs {key}")
        beam = body["beam_number"]
        if not isinstance(beam, int) or isinstance(beam, bool) or beam < 0:
            raise bad("beam_number must be a non-negative integer")
        if not isinstance(body["name"], str):
            raise bad("name must be a string")
        energy = number(body["energy_mv"], "energy_mv")
        rate = number(body["dose_rate"], "dose_rate")
        total = number(body["total_meterset"], "total_meterset")
        start = number(body["start_meterset"], "start_meterset", 0.0)
        end = total
        if body["end_meterset"] is not None:
            end = number(body["end_meterset"], "end_meterset")
        cps = body["control_points"]
        if not isinstance(cps, list) or len(cps) < 2:
            raise bad("control_points must list at least two control points")
        previous = -math.inf
        mlc_lengths = set()
        for i, cp in enumerate(cps):
            if not isinstance(cp, dict):
                raise bad(f"control point {i} is not an object")
            for key in ("index", "cumulative_meterset", "gantry_angle", "collimator_angle"):
                if key not in cp:
                    raise bad(f"control point {i} needs {key}")
            if cp["index"] != i or isinstance(cp["index"], bool):
                raise bad(f"control point {i} has index {cp['index']!r}; indices are 0, 1, 2, ...")
            cum = number(cp["cumulative_meterset"], f"control point {i} cumulative_meterset", 0)
            if cum < previous:
                raise bad(f"control point {i}: cumulative_meterset decreases")
            previous = cum
            number(cp["gantry_angle"], f"control point {i} gantry_angle")
            number(cp["collimator_angle"], f"control point {i} collimator_angle")
            jaws = cp.get("jaws")
            if not isinstance(jaws, list) or len(jaws) != 4:
                raise bad(f"control point {i}: jaws must be [X1, X2, Y1, Y2]")
            for v in jaws:
                number(v, f"control point {i} jaws")
            mlc = cp.get("mlc")
            if not isinstance(mlc, list):
                raise bad(f"control point {i}: mlc must be a list")
            for v in mlc:
                number(v, f"control point {i} mlc")
            mlc_lengths.add(len(mlc))
        if abs(previous - total) > 1e-3:
            raise bad("the last control point's cumulative_meterset is not total_meterset")
        if not (0 <= start < end <= total + 1e-9):
            raise bad("start_meterset and end_meterset must satisfy 0 <= start < end <= total")
        if len(mlc_lengths) != 1:
            raise bad("every control point's mlc must have the same number of leaves")
        caps = self.capabilities
        if not any(abs(energy - float(e)) < 1e-6 for e in caps["energies_mv"]):
            raise ProtocolRefusal("LIMIT", f"{energy:g} MV is not one of {caps['energies_mv']} MV")
        if not float(caps["min_dose_rate"]) <= rate <= float(caps["max_dose_rate"]):
            raise ProtocolRefusal(
                "LIMIT",
                f"dose rate {rate:g} MU/min is outside "
                f"{caps['min_dose_rate']}-{caps['max_dose_rate']} MU/min",
            )
        (leaves,) = mlc_lengths
        if leaves not in (0, 2 * int(caps["mlc_leaf_pairs"])):
            raise ProtocolRefusal(
                "LIMIT", f"{leaves} MLC leaves; this MLC has {2 * int(caps['mlc_leaf_pairs'])}"
            )
        return {**body, "_start": start, "_end": end, "_total": total, "_rate": rate}

    def _load_beam(self, body: dict[str, Any]) -> None:
        busy = self._busy()
        if busy:
            raise ProtocolRefusal("BUSY", f"LOAD_BEAM refused: {busy}")
        try:
            program = self._validate_program(body)
        except ProtocolRefusal:
            self._loaded = None
            raise
        self._loaded = None
        cps = program["control_points"]
        k = machine.start_control_point(cps, program["_start"])
        origin = self._axes.copy()
        target = Axes.of(cps[k])
        travel = abs(machine.angle_diff(origin.gantry, target.gantry))
        duration = travel / float(self.capabilities["gantry_speed_deg_s"]) * self.time_scale
        token = self._token

        def apply(f: float) -> None:
            self._axes = origin.lerp(target, f)

        def finish() -> list[tuple[str, dict[str, Any]]]:
            self._axes = target.copy()
            self._loaded = program
            return [("LOADED", {"beam": program["beam_number"]})]

        self._start_operation(_Operation("LOAD_BEAM", duration, token, apply, finish))

    # MOVE_COUCH --------------------------------------------------------------------

    def _move_couch(self, body: dict[str, Any]) -> None:
        busy = self._busy()
        if busy:
            raise ProtocolRefusal("BUSY", f"MOVE_COUCH refused: {busy}")
        asked = {}
        for axis in COUCH_AXES:
            if axis not in body:
                raise ProtocolRefusal("BAD_REQUEST", f"MOVE_COUCH needs {axis}")
            if not is_finite_number(body[axis]):
                raise ProtocolRefusal("BAD_REQUEST", f"{axis} must be a number")
            asked[axis] = float(body[axis])
        limit_mm = float(self.capabilities["couch_limits_mm"])
        limit_deg = float(self.capabilities["couch_rotation_limits_deg"])
        for axis in TRANSLATION_AXES:
            if abs(asked[axis]) > limit_mm:
                raise ProtocolRefusal(
                    "LIMIT", f"{axis} {asked[axis]:g} is beyond the couch limit of {limit_mm:g} mm"
                )
        for axis in ROTATION_AXES:
            if abs(asked[axis]) > limit_deg:
                raise ProtocolRefusal(
                    "LIMIT",
                    f"{axis} {asked[axis]:g} is beyond the couch limit of {limit_deg:g} degrees",
                )
        motion = dict(asked)
        if self._swap_long_vert:
            motion["longitudinal_mm"], motion["vertical_mm"] = (
                asked["vertical_mm"],
                asked["longitudinal_mm"],
            )
        for axis, fault in list(self._short.items()):
            amount, moves = fault
            if motion[axis] == 0:
                continue
            cut = min(amount, abs(motion[axis]))
            motion[axis] -= math.copysign(cut, motion[axis])
            if moves is not None:
                fault[1] = moves - 1
                if fault[1] <= 0:
                    del self._short[axis]
        duration = max(
            max(abs(motion[a]) for a in TRANSLATION_AXES)
            / float(self.capabilities["couch_speed_mm_s"]),
            max(abs(motion[a]) for a in ROTATION_AXES) / COUCH_ROTATION_SPEED_DEG_S,
        )
        origin = dict(self._couch)
        origin_pose = self._table
        token = self._token

        def apply(f: float) -> None:
            # each field is an axis of its own; the table top makes one rigid motion
            for axis in COUCH_AXES:
                self._couch[axis] = origin[axis] + f * motion[axis]
            part = {axis: f * motion[axis] for axis in COUCH_AXES}
            self._table = machine.compose(machine.move_pose(part), origin_pose)

        def finish() -> list[tuple[str, dict[str, Any]]]:
            apply(1.0)
            return [("COUCH_POSITION", {k: round(v, 3) for k, v in self._couch.items()})]

        self._start_operation(
            _Operation("MOVE_COUCH", duration * self.time_scale, token, apply, finish)
        )

    # ACQUIRE -----------------------------------------------------------------------

    def patient_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """(R, t) in LPS: where the anatomy is, p = R u + t (setup error, then every couch
        move), ``u`` a point of the anatomy relative to its setup point (``isocenter``) and
        ``p`` where it is relative to the machine's isocentre."""
        with self._lock:
            self._apply_motion(time.monotonic())
            r_couch, d_couch = machine.pose_in_lps(self._table, self.patient_position)
        return r_couch @ self.setup_rotation, r_couch @ self.setup_translation + d_couch

    def _acquire(self, body: dict[str, Any]) -> None:
        busy = self._busy()
        if busy:
            raise ProtocolRefusal("BUSY", f"ACQUIRE refused: {busy}")
        kind = body.get("kind")
        if not isinstance(kind, str) or not kind:
            raise ProtocolRefusal("BAD_REQUEST", "ACQUIRE needs a kind")
        if kind != "CBCT":
            raise ProtocolRefusal("LIMIT", f"this imager takes CBCT only, not {kind}")
        rotation, translation = self.patient_pose()
        self._acquisitions += 1
        rng = np.random.default_rng([self._seed, self._acquisitions])
        result: dict[str, Any] = {}

        def prepare() -> None:
            stored = acquire(self._anatomy, self.cbct_geometry, rotation, translation, rng)
            result["bodies"] = images_bodies(
                stored,
                self.cbct_geometry,
                kind,
                self.max_planes_per_frame,
                isocenter=self._anatomy.isocenter,
            )
            result["stored"] = stored

        def finish() -> list[tuple[str, dict[str, Any]]]:
            self.last_cbct = result.get("stored")
            return [("IMAGES", b) for b in result["bodies"]]

        self._start_operation(
            _Operation(
                "ACQUIRE", CBCT_S * self.time_scale, self._token, lambda f: None, finish, prepare
            )
        )

    # ------------------------------------------------------------------ delivery --

    def _beam_on(self, body: dict[str, Any]) -> None:
        if self._beam is not None:
            raise ProtocolRefusal("BUSY", "a beam is already on")
        if self._op is not None:
            raise ProtocolRefusal("BUSY", f"BEAM_ON refused: {self._op.name} is running")
        program = self._loaded
        if program is None:
            raise ProtocolRefusal("NOT_LOADED", "no beam is loaded")
        self._loaded = None  # loaded for one BEAM_ON only
        number = int(program["beam_number"])
        trip = None
        if number in self._trips and self._trips[number][0] < program["_end"] + self._overrun:
            trip = self._trips.pop(number)
        dosimetry = Dosimetry(
            program["control_points"],
            start=program["_start"],
            end=program["_end"],
            dose_rate=program["_rate"],
            gantry_speed=float(self.capabilities["gantry_speed_deg_s"]),
            leaf_speed=LEAF_SPEED_MM_S,
            overrun=self._overrun,
            trip=trip,
            rng=np.random.default_rng([self._seed, len(self._records) + 1]),
        )
        record = DeliveryRecord(
            number,
            program["_start"],
            program["_end"],
            round(program["_start"], 2),
            started_at=time.time(),
        )
        self._records.append(record)
        beam = _Beam(program, dosimetry, self._token, record)
        self._beam = beam
        ramp = BEAM_ON_DELAY_S * self.time_scale
        if ramp > RAMP_SHARE_OF_SILENCE * float(self.timing.get("silence_s", 5.0)):
            # a ramp-up longer than the host waits for BEAM_STARTED: it goes at once and
            # the first METERSET later (Delivery)
            beam.started_sent = True
            self._send(beam.token, "BEAM_STARTED", {"beam": number, "start_meterset": record.start})
        thread = threading.Thread(target=self._run_beam, args=(beam,), daemon=True)
        thread.name = f"ctrl-beam{number}"
        thread.start()

    def _advance_beam_locked(self, now: float, send: bool) -> None:
        """Bring the beam's dosimetry up to ``now``.  Control points reached wait in
        ``pending`` (in order) until the beam's next report; with ``send`` they go now, and
        a beam that came to its end (or tripped) is reported ended."""
        beam = self._beam
        if beam is None or beam.radiation_at is None:
            return
        machine_t = (now - beam.radiation_at) / self.time_scale
        for event in beam.dosimetry.run_until(machine_t):
            if event.kind == "cp":
                index = event.index - 1 if self._cp_from_zero else event.index
                beam.pending.append(
                    {"index": index, "meterset": event.meterset, "gantry": event.gantry}
                )
        beam.record.measured = beam.dosimetry.measured
        if send:
            self._flush_pending_locked(beam)
            if beam.dosimetry.finished:
                d = beam.dosimetry
                self._finish_beam_locked(d.termination, d.code, d.reason, send=True)

    def _flush_pending_locked(self, beam: _Beam) -> None:
        for body in beam.pending:
            self._send(beam.token, "CONTROL_POINT", body)
        beam.pending = []

    def _finish_beam_locked(self, termination: str, code: str, reason: str, send: bool) -> None:
        beam = self._beam
        if beam is None:
            return
        d = beam.dosimetry
        now = time.monotonic()
        stopped = now
        if d.finished and beam.radiation_at is not None:
            # it stopped by itself (its end, an interlock) at a dosimetry sample: then
            stopped = min(now, beam.radiation_at + d.t * self.time_scale)
        d.stop(termination, code, reason)
        record = beam.record
        record.measured = d.measured
        record.termination, record.code, record.reason = d.termination, d.code, d.reason
        record.ended_at = time.time() - (now - stopped)
        self._axes = d.axes.copy()
        self._beam = None
        beam.stop.set()
        if send:
            if not beam.started_sent:
                beam.started_sent = True
                self._send(
                    beam.token,
                    "BEAM_STARTED",
                    {"beam": record.beam, "start_meterset": record.start},
                )
            self._flush_pending_locked(beam)
            self._send(
                beam.token,
                "BEAM_ENDED",
                {
                    "meterset": record.measured,
                    "termination": record.termination,
                    "reason": record.reason,
                    "code": record.code,
                },
            )

    def _host_silent(self, now: float) -> bool:
        link = self._link
        return link is None or now - link.last_rx > HOST_SILENCE_S

    def _lose_silent_host_locked(self, beam: _Beam, now: float) -> None:
        """Nothing from the host for 2 s with the beam on: the host is lost, the beam stops."""
        self._advance_beam_locked(now, send=False)
        if self._beam is not beam:
            return
        link = self._link
        if link is not None:
            self._on_lost(link, f"nothing from the host for {HOST_SILENCE_S:g} s")
        else:
            self._finish_beam_locked("MACHINE", "LINK", "host lost", send=False)

    def _run_beam(self, beam: _Beam) -> None:
        delay = BEAM_ON_DELAY_S * self.time_scale
        deadline = beam.on_at + delay
        while True:
            if beam.stop.wait(max(0.0, min(deadline - time.monotonic(), 0.1))):
                return
            with self._lock:
                if self._beam is not beam:
                    return
                now = time.monotonic()
                if self._host_silent(now):
                    self._lose_silent_host_locked(beam, now)
                    return
                if now >= deadline:
                    beam.radiation_at = now
                    beam.last_rate_t = 0.0
                    if not beam.started_sent:
                        beam.started_sent = True
                        self._send(
                            beam.token,
                            "BEAM_STARTED",
                            {"beam": beam.record.beam, "start_meterset": beam.record.start},
                        )
                    break
        next_tick = beam.radiation_at + self._tick_period
        while True:
            if beam.stop.wait(max(0.0, next_tick - time.monotonic())):
                return
            with self._lock:
                if self._beam is not beam:
                    return
                now = time.monotonic()
                if self._host_silent(now):
                    self._lose_silent_host_locked(beam, now)
                    return
                self._advance_beam_locked(now, send=True)
                if self._beam is not beam:
                    return
                d = beam.dosimetry
                # METERSET from the first MU counted on (a count above the start), then
                # every tick, a motion without MU included
                if d.measured <= d.start:
                    beam.last_rate_t = d.t  # nothing counted yet: no METERSET
                elif d.t > beam.last_rate_t or d.m > beam.last_rate_m:
                    dt = d.t - beam.last_rate_t
                    rate = (d.m - beam.last_rate_m) / dt * 60.0 if dt > 0 else 0.0
                    beam.last_rate_m, beam.last_rate_t = d.m, d.t
                    self._send(
                        beam.token,
                        "METERSET",
                        {"meterset": d.measured, "dose_rate": round(max(0.0, rate), 1)},
                        coalesce=True,
                    )
            next_tick += self._tick_period
            now = time.monotonic()
            if next_tick <= now:
                next_tick = now + self._tick_period
