"""An independent treatment-machine controller for protocol version 2 (hil/PROTOCOL.md).

Written from the protocol document and its JSON Schemas only, to judge the host: a
simulated C-arm linac (6, 10, 15 MV; 100-1400 MU/min; 60 MLC leaf pairs; gantry 6 deg/s),
a 6-DOF couch (20 mm/s, 1 deg/s, limits 50 mm and 3 deg per move) and a CBCT imager.

Public API
==========

``IndependentController(time_scale=1.0, patient_position="HFS", anatomy=None,
identity=None, capabilities=None, timing=None, *, isocenter=None, cbct_geometry=None,
max_planes_per_frame=None, setup_translation_mm=(3.0, -2.0, 1.5),
setup_rotation_deg=(0.8, -0.6, 1.2), seed=20240)``
    ``time_scale`` multiplies every machine duration (1: real time, 0.1: ten times
    faster); HELLO_REPLY ``timing`` states every figure of the document's table: the
    scaled ``progress_interval_s``, ``tick_s`` (floors 0.1 s and 0.05 s; PROGRESS /
    METERSET go out every half of it) and ``max_s``, and the wall-clock ``silence_s`` 5,
    ``heartbeat_s`` 0.5, ``hello_s`` 5 and ``reconnect_s`` 10.  BEAM_STARTED goes when the
    beam is on (a 0.5 s ramp-up, scaled), at once if that ramp-up is over half of
    ``silence_s``.  ``identity``, ``capabilities`` and ``timing`` are merged over the
    defaults and announced in HELLO_REPLY.  ``anatomy``: the planning CT, a directory of
    DICOM CT files, or ``(hu_volume[z, y, x], origin_xyz, spacing_xyz)``, or an
    :class:`Anatomy`; None images a water-cylinder phantom centred on its origin.
    ``isocenter``: where the rig puts the machine's isocentre in the planning CT (LPS,
    mm); None: the planning CT's origin (0, 0, 0), as PROTOCOL.md's Images section has
    it; ``"plan"``: the isocentre of an RT Plan in the anatomy directory.  A patient lying
    as planned has that point at the isocentre.  IMAGES are in the planning CT's
    coordinates: the grid is centred on the isocentre and ``origin`` shifted by
    ``isocenter``, so a CBCT with no setup error and no couch move is the planning CT
    itself (registering the two gives the identity).  ``setup_translation_mm`` /
    ``setup_rotation_deg``: the setup error (LPS; a rotation about the isocentre, x then
    y then z extrinsic, then the translation); zeros for a patient lying as planned.

Serving (background threads; one host at a time):
    ``serve_tcp(host="127.0.0.1", port=0) -> (host, port)``
    ``serve_pty() -> slave_path`` (the line stays up across host sessions)
    ``stop()`` (also a context manager)

Fault knobs (thread-safe, usable while a session runs):
    ``trip_interlock(beam, meterset, code="DOOR", reason=None)``
    ``drop_link(down_s=1.0)``: the connection closes at once (RST), new ones are refused
    for ``down_s``; on a pty the line is dead (bytes vanish both ways) for ``down_s``.
    ``stall(seconds)``: no ACK, no frame, received frames discarded; the machine runs on.
    ``couch_stops_short(axis, mm, moves=None)``: axis ``"longitudinal"`` or
    ``"longitudinal_mm"`` etc.; ``moves`` None = every move until ``mm`` 0 clears it.
    ``overrun(mu)``, ``cp_index_from_zero(enabled=True)``, ``swap_long_vert(enabled=True)``,
    ``clear_faults()``.

Ground truth:
    ``deliveries`` (list of :class:`DeliveryRecord`: beam, start, end, measured,
    termination, code, reason, started_at, ended_at: when the beam stopped),
    ``last_delivery`` (the HELLO_REPLY body: code and reason "" until the beam ended),
    ``sessions`` (HELLOs answered, with HELLO_REPLY or ERROR, retransmitted ones too),
    ``couch_position()`` (six table-top values: each field an axis of its own, the sum of
    what the moves made of it), ``machine_state()`` (a STATE body), ``patient_pose()``
    ((R, t) in LPS: p = R u + t, ``u`` relative to ``isocenter``, ``p`` to the machine's
    isocentre; the setup error, then every couch move composed as one rigid motion each,
    rotation about the isocentre first), ``anatomy`` (``isocenter``, ``plan_isocenter``),
    ``last_cbct`` (uint16 volume), ``traffic`` (every frame body received and queued),
    ``connected``.

Lower layers: :mod:`.framing` (COBS, CRC-16/CCITT-FALSE, frames), :mod:`.link`
(stop-and-wait link over a byte transport), :mod:`.machine` (axes, couch geometry,
dosimetry), :mod:`.imaging` (CBCT).

CLI: ``python -m tests.peers.controller --tcp 127.0.0.1:0 --time-scale 0.1`` prints
``controller listening on tcp://HOST:PORT`` (``--pty`` prints ``serial://PATH``);
``--anatomy DIR``, ``--isocenter X,Y,Z|plan``, ``--patient-position``.
"""

from .controller import (
    DEFAULT_CAPABILITIES,
    DEFAULT_IDENTITY,
    DeliveryRecord,
    IndependentController,
)
from .imaging import Anatomy, CbctGeometry
from .machine import COUCH_AXES, IEC_TO_LPS, extrinsic_xyz, lps_to_table_top

__all__ = [
    "COUCH_AXES",
    "DEFAULT_CAPABILITIES",
    "DEFAULT_IDENTITY",
    "IEC_TO_LPS",
    "Anatomy",
    "CbctGeometry",
    "DeliveryRecord",
    "IndependentController",
    "extrinsic_xyz",
    "lps_to_table_top",
]
