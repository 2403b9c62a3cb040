"""Turns YAML files and command-line flags into typed configuration, validated in one place.

Every flag has a YAML key of the same name (dashes become underscores); a flag given on
the command line wins over the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from emulator.net.ae_factory import NetworkSettings
from emulator.net.peers import Peer, PeerError, validate_ae_title
from emulator.profile import UID_SETS
from emulator.reference.archive import ArchiveConfig
from emulator.reference.tms_faults import REFUSE_ALWAYS, TmsFaults, parse_holds
from emulator.seeding import AFTERLOADER_PATIENTS, AFTERLOADER_SMALL, SOAK_PATIENTS, SeedOptions
from emulator.store import AdmissionLimits, DuplicatePolicy

if TYPE_CHECKING:
    from emulator.performer.workflow import DeviceConfig
    from emulator.reference.site import SiteConfig


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


def load_yaml_config(path: Path | None, section: str) -> dict[str, Any]:
    """The ``section`` mapping of a YAML config file (or the whole file if it has none)."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping")
    section_data = data.get(section, data)
    if not isinstance(section_data, dict):
        raise ConfigError(f"config {path}: '{section}' must be a mapping")
    return section_data


def merge(file_values: dict[str, Any], flag_values: dict[str, Any]) -> dict[str, Any]:
    """Flags that were given (not None, not empty lists) override the file."""
    merged = dict(file_values)
    merged.update({k: v for k, v in flag_values.items() if v is not None and v != []})
    return merged


def _peers(values: Any) -> list[Peer]:
    if values in (None, ""):
        return []
    if isinstance(values, str):
        values = [values]
    try:
        return [Peer.parse(str(v)) for v in values]
    except PeerError as exc:
        raise ConfigError(str(exc)) from exc


def _check_known(
    values: dict[str, Any], known: set[str], section: str, data_dir_required: bool = True
) -> None:
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown {section} settings: {', '.join(sorted(unknown))}")
    if data_dir_required and not values.get("data_dir"):
        raise ConfigError("data_dir is required")


def _ae_title(values: dict[str, Any], key: str, default: str) -> str:
    try:
        return validate_ae_title(str(values.get(key, default)))
    except PeerError as exc:
        raise ConfigError(str(exc)) from exc


def _allowed(values: dict[str, Any]) -> list[str]:
    try:
        return [validate_ae_title(str(a)) for a in values.get("allow") or []]
    except PeerError as exc:
        raise ConfigError(str(exc)) from exc


def _port(values: dict[str, Any], key: str, default: int) -> int:
    port = int(values.get(key, default))
    if not 0 <= port < 65536:
        raise ConfigError(f"{key} {port} out of range")
    return port


def _choice(values: dict[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = str(values.get(key, default))
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}")
    return value


def archive_config(values: dict[str, Any]) -> ArchiveConfig:
    """Validates the merged ``archive`` settings."""
    known = {
        "data_dir",
        "ae_title",
        "host",
        "port",
        "peer",
        "peers",
        "allow",
        "accept_any_ae",
        "duplicate_policy",
        "uids",
        "max_dataset_bytes",
        "import_dir",
        *TLS_SETTINGS,
        *ADMISSION_SETTINGS,
    }
    _check_known(values, known, "archive")
    ae_title = _ae_title(values, "ae_title", "ARCHIVE")
    allow = _allowed(values)
    port = _port(values, "port", 11112)
    uids = _choice(values, "uids", "final", UID_SETS)
    try:
        policy = DuplicatePolicy(str(values.get("duplicate_policy", "reject")))
    except ValueError as exc:
        raise ConfigError("duplicate_policy must be 'reject' or 'replace'") from exc
    limits = AdmissionLimits()
    if values.get("max_dataset_bytes"):
        limits = AdmissionLimits(max_dataset_bytes=int(values["max_dataset_bytes"]))
    return ArchiveConfig(
        data_dir=Path(values["data_dir"]),
        ae_title=ae_title,
        host=str(values.get("host", "127.0.0.1")),
        port=port,
        peers=_peers(values.get("peers")) + _peers(values.get("peer")),
        allowed_callers=allow,
        accept_any_ae=bool(values.get("accept_any_ae", False)),
        duplicate_policy=policy,
        uid_set=uids,
        limits=limits,
        network=network_settings(values),
    )


def _refusals(value: Any) -> int:
    """``fault_refuse_canceled``: a count, or ``always`` (-1), of CANCELED to refuse."""
    if value in (None, "", 0, "0"):
        return 0
    if str(value).lower() == "always":
        return REFUSE_ALWAYS
    try:
        count = int(value)
    except ValueError as exc:
        raise ConfigError(
            f"fault_refuse_canceled must be a count or 'always', not {value!r}"
        ) from exc
    if count < 0:
        raise ConfigError("fault_refuse_canceled must be 0 or more, or 'always'")
    return count


def _holds(value: Any) -> dict[str, float]:
    """``fault_hold_reply``: ``STATE=SECONDS`` items, one or a list."""
    items = [value] if isinstance(value, str) else list(value or [])
    try:
        return parse_holds(items)
    except ValueError as exc:
        raise ConfigError(f"fault_hold_reply {exc}") from exc


def _seconds(values: dict[str, Any], key: str, default: float) -> float:
    try:
        seconds = float(values.get(key, default))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key} must be a number of seconds") from exc
    if seconds < 0:
        raise ConfigError(f"{key} must be 0 or more seconds")
    return seconds


def _device_timing(value: Any) -> dict[str, float]:
    """``device_timing``: a rig's overrides of the controller's timing budget (hil/PROTOCOL.md)."""
    from devices.timing import TIMING_KEYS

    if not value:
        return {}
    if not isinstance(value, dict):
        raise ConfigError("device_timing must be a mapping, e.g. {silence_s: 10}")
    unknown = set(value) - set(TIMING_KEYS)
    if unknown:
        raise ConfigError(
            f"device_timing: unknown {', '.join(sorted(unknown))}; known: {', '.join(TIMING_KEYS)}"
        )
    return {k: _seconds(value, k, 0.0) for k in value}


def site_config(values: dict[str, Any]) -> SiteConfig:
    """Validates the merged ``tms`` settings (the TMS and its co-hosted Archive)."""
    from emulator.profile import EDITIONS
    from emulator.reference.site import SiteConfig

    known = {
        "data_dir",
        "ae_title",
        "host",
        "port",
        "archive_ae_title",
        "archive_port",
        "peer",
        "peers",
        "allow",
        "seed",
        "seed_afterloader",
        "seed_scenarios",
        "accept_any_ae",
        "profile",
        "uids",
        "stations",
        "fault_refuse_canceled",
        "fault_hold_reply",
        "max_request_bytes",
        "feed",
        "feed_for",
        "feed_prime",
        "seed_size",
        *METRICS_SETTINGS,
        *TLS_SETTINGS,
        *ADMISSION_SETTINGS,
    }
    _check_known(values, known, "tms")
    tms_ae = _ae_title(values, "ae_title", "TMS")
    archive_ae = _ae_title(values, "archive_ae_title", "ARCHIVE")
    allow = _allowed(values)
    if tms_ae == archive_ae:
        raise ConfigError("the TMS and the Archive need different AE titles")
    ports = [_port(values, "port", 11114), _port(values, "archive_port", 11112)]
    edition = _choice(values, "profile", "ihe-ro-2008", EDITIONS)
    uids = _choice(values, "uids", "final", UID_SETS)
    peers = _peers(values.get("peers")) + _peers(values.get("peer"))
    accept_any = bool(values.get("accept_any_ae", False))
    if not accept_any and not peers and not allow:
        raise ConfigError(
            "no caller would be accepted: configure --peer or --allow, or --accept-any-ae"
        )
    return SiteConfig(
        data_dir=Path(values["data_dir"]),
        faults=TmsFaults(
            refuse_canceled=_refusals(values.get("fault_refuse_canceled")),
            hold_reply_s=_holds(values.get("fault_hold_reply")),
        ),
        max_request_bytes=_positive(values, "max_request_bytes", 1 << 20, int),
        tms_ae_title=tms_ae,
        archive_ae_title=archive_ae,
        host=str(values.get("host", "127.0.0.1")),
        tms_port=ports[0],
        archive_port=ports[1],
        peers=peers,
        allowed_callers=allow,
        accept_any_ae=accept_any,
        edition=edition,
        uid_set=uids,
        network=network_settings(values),
        feed=_feed_plan(values),
        seed_options=SOAK_PATIENTS if values.get("seed_size") == "small" else SeedOptions(),
        brachy_options=(
            AFTERLOADER_SMALL if values.get("seed_size") == "small" else AFTERLOADER_PATIENTS
        ),
    )


def _feed_plan(values: dict[str, Any]):
    """``feed: SOAK*`` (and ``feed_for: 10m``): stations the TMS keeps supplied."""
    from emulator.reference.feeder import FeedPlan

    pattern = values.get("feed")
    if not pattern:
        return None
    for_s = values.get("feed_for")
    prime = tuple(str(station) for station in values.get("feed_prime") or ())
    return FeedPlan(str(pattern), parse_seconds(for_s) if for_s else None, prime)


def parse_seconds(text: str | float) -> float:
    """``300``, ``300s``, ``5m``, ``8h`` to seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = str(text).strip().lower()
    factor = units.get(text[-1:])
    number = text[:-1] if factor else text
    try:
        seconds = float(number) * (factor or 1)
    except ValueError as exc:
        raise ConfigError(f"a duration is like 300, 300s, 5m or 8h, not {text!r}") from exc
    if seconds <= 0:
        raise ConfigError("a duration must be positive")
    return seconds


# DICOM TLS: certificate, key and CA, all three or none (emulator/net/tls.py).
TLS_SETTINGS = ("tls_cert", "tls_key", "tls_ca", "tls_no_client_auth")


def tls_file_flags(values: dict[str, Any], prefix: str = "--") -> list[str]:
    """The certificate, key and CA of ``values`` as command-line flags for a child process
    (``--tls-cert FILE``..., or Locust's ``--tdw-tls-cert FILE``... with another prefix)."""
    return [
        arg
        for key in ("tls_cert", "tls_key", "tls_ca")
        if values.get(key)
        for arg in (f"{prefix}{key.replace('_', '-')}", str(values[key]))
    ]


# Admission before association (emulator/net/connection_guard.py) and the slot count.
ADMISSION_SETTINGS = (
    "tls_handshake_timeout",
    "association_request_timeout",
    "max_pending_per_address",
    "max_pending_connections",
    "max_associations",
)


def _positive(values: dict[str, Any], key: str, default: float, kind: type = float):
    try:
        value = kind(values.get(key, default))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key} must be a {kind.__name__}") from exc
    if value <= 0:
        raise ConfigError(f"{key} must be positive")
    return value


def network_settings(values: dict[str, Any]) -> NetworkSettings:
    """Association settings shared by every command; TLS when its files are configured."""
    from emulator.net.connection_guard import AdmissionLimits
    from emulator.net.tls import TlsError, tls_from_values

    defaults, base = AdmissionLimits(), NetworkSettings()
    admission = AdmissionLimits(
        handshake_s=_positive(values, "tls_handshake_timeout", defaults.handshake_s),
        request_deadline_s=_positive(
            values, "association_request_timeout", defaults.request_deadline_s
        ),
        max_pending_per_address=_positive(
            values, "max_pending_per_address", defaults.max_pending_per_address, int
        ),
        max_pending=_positive(values, "max_pending_connections", defaults.max_pending, int),
    )
    associations = _positive(values, "max_associations", base.maximum_associations, int)
    try:
        return NetworkSettings(
            tls=tls_from_values(values),
            admission=admission,
            maximum_associations=associations,
            dimse_timeout=_positive(values, "dimse_timeout", base.dimse_timeout),
        )
    except TlsError as exc:
        raise ConfigError(str(exc)) from exc


# Where ``/metrics`` is served; loopback unless ``metrics_host`` says otherwise.
METRICS_SETTINGS = ("metrics_host", "metrics_port")


def metrics_endpoint(values: dict[str, Any]) -> tuple[str, int] | None:
    """(host, port) to serve Prometheus metrics on, or None when no port is configured."""
    if values.get("metrics_port") in (None, ""):
        return None
    return str(values.get("metrics_host") or "127.0.0.1"), _port(values, "metrics_port", 0)


# Settings of ``tdw-emu run``: each is a flag (dashes) and a YAML key (underscores).
RUN_SETTINGS = (
    "kind",
    "station",
    "tms",
    "archive",
    "ae_title",
    "listen_port",
    "listen_host",
    "profile",
    "uids",
    "time_scale",
    "sessions",
    "wait",
    "interrupt",
    "device",
    "data_dir",
    "report_dir",
    "tms_retry_window",
    "dimse_timeout",
    "device_timing",
    "progress_every",
    *METRICS_SETTINGS,
    *TLS_SETTINGS,
)


def parse_interrupt(text: str | None) -> dict[int, float]:
    """``BEAM:MU`` as an interlock to inject, e.g. ``2:40``."""
    if not text:
        return {}
    beam, _, meterset = str(text).partition(":")
    try:
        value = {int(beam): float(meterset)}
    except ValueError as exc:
        raise ConfigError(f"--interrupt must be BEAM:MU, not {text!r}") from exc
    if next(iter(value.values())) <= 0:
        raise ConfigError("--interrupt meterset must be positive")
    return value


def default_device_dir(ae_title: str, station: str) -> Path:
    """Where a device keeps its journal when no --data-dir is given: the user's state
    directory (XDG_STATE_HOME, ~/.local/state), keyed by AE title and station, so the same
    command after a kill or a Ctrl-C finds what it left and ends it."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{ae_title.strip()}-{station.strip()}")
    return base / "tdw-emulator" / "devices" / safe


def device_config(values: dict[str, Any]) -> tuple[DeviceConfig, int, float, Path | None]:
    """Validates the merged ``run`` settings: the device config, sessions, wait, report dir."""
    from emulator.performer.actors import KINDS
    from emulator.performer.workflow import DeviceConfig
    from emulator.profile import EDITIONS

    _check_known(values, set(RUN_SETTINGS), "run", data_dir_required=False)
    for key in ("kind", "station", "tms", "archive"):
        if not values.get(key):
            raise ConfigError(f"{key} is required")
    kind = _choice(values, "kind", "pds", tuple(KINDS))
    tms, archive = _peers(values["tms"])[0], _peers(values["archive"])[0]
    scale = float(values.get("time_scale", 0.0))
    if scale < 0:
        raise ConfigError("time_scale must be 0 or positive")
    raw_sessions = values.get("sessions", 1)
    if str(raw_sessions).strip().lower() == "all":
        sessions = None  # until the worklist holds nothing more this device may take
    else:
        try:
            sessions = int(raw_sessions)
        except ValueError:
            raise ConfigError(f"sessions must be a number or 'all', not {raw_sessions!r}") from None
        if sessions < 1:
            raise ConfigError("sessions must be at least 1 (or 'all')")
    config = DeviceConfig(
        kind=kind,
        station=str(values["station"]),
        ae_title=_ae_title(values, "ae_title", kind.upper() + "1"),
        tms=tms,
        archive=archive,
        data_dir=Path(values["data_dir"])
        if values.get("data_dir")
        else default_device_dir(
            _ae_title(values, "ae_title", kind.upper() + "1"), str(values["station"])
        ),
        listen_host=str(values.get("listen_host", "127.0.0.1")),
        listen_port=_port(values, "listen_port", 11113),
        edition=_choice(values, "profile", "ihe-ro-2008", EDITIONS),
        uid_set=_choice(values, "uids", "final", UID_SETS),
        time_scale=scale,
        device=str(values.get("device") or ""),
        interlocks=parse_interrupt(values.get("interrupt")),
        network=network_settings(values),
        tms_retry_window=_seconds(values, "tms_retry_window", 120.0),
        device_timing=_device_timing(values.get("device_timing")),
        progress_every_s=(
            _seconds(values, "progress_every", 0.0) if values.get("progress_every") else None
        ),
    )
    report_dir = Path(values["report_dir"]) if values.get("report_dir") else None
    return config, sessions, float(values.get("wait", 0.0)), report_dir
