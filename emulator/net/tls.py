"""DICOM TLS (PS3.15 Annex B, BCP 195): one certificate, key and CA for every association.

An AE both accepts associations (server side) and requests them (client side, including
the C-MOVE sub-operations a server opens towards a move destination), so one ``TlsConfig``
builds both contexts. Peers are authenticated both ways by default: a device on a hospital
network must not talk DICOM with whoever connects. TLS 1.2 is the floor (BCP 195).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


class TlsError(ValueError):
    """A TLS setting that cannot work (missing file, key without certificate...)."""


@dataclass(frozen=True)
class TlsConfig:
    certificate: Path
    private_key: Path
    ca: Path
    require_peer_certificate: bool = True
    check_hostname: bool = True

    def __post_init__(self) -> None:
        for what, path in (
            ("certificate", self.certificate),
            ("private key", self.private_key),
            ("CA", self.ca),
        ):
            if not Path(path).is_file():
                raise TlsError(f"TLS {what} file {path} does not exist")

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        context = ssl.create_default_context(purpose, cafile=str(self.ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(str(self.certificate), str(self.private_key))
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"TLS certificate or key unusable: {exc}") from exc
        return context

    def server_context(self) -> ssl.SSLContext:
        """For accepted associations: our certificate; the caller's checked against the CA."""
        context = self._context(ssl.Purpose.CLIENT_AUTH)
        context.verify_mode = (
            ssl.CERT_REQUIRED if self.require_peer_certificate else ssl.CERT_OPTIONAL
        )
        return context

    def client_context(self) -> ssl.SSLContext:
        """For requested associations: the server's certificate checked, ours presented."""
        context = self._context(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = self.check_hostname
        return context

    def client_args(self, host: str) -> tuple[ssl.SSLContext, str]:
        """pynetdicom's ``tls_args`` for an association to ``host``."""
        return self.client_context(), host


def tls_from_values(values: dict) -> TlsConfig | None:
    """``tls_cert``, ``tls_key``, ``tls_ca`` (all or none) from flags or YAML."""
    given = {k: values.get(k) for k in ("tls_cert", "tls_key", "tls_ca")}
    if not any(given.values()):
        return None
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise TlsError(f"TLS needs tls_cert, tls_key and tls_ca; missing {', '.join(missing)}")
    return TlsConfig(
        Path(given["tls_cert"]),
        Path(given["tls_key"]),
        Path(given["tls_ca"]),
        require_peer_certificate=not values.get("tls_no_client_auth", False),
    )
