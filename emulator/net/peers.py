"""Remote application entities, written ``AET@HOST:PORT`` on the command line and in YAML."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

_PEER = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>\[[0-9a-fA-F:]+\]|[^:@\s]+):(?P<port>\d{1,5})$")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: no backslash, no control


def is_pattern(ae_title: str) -> bool:
    """An AE title with glob characters stands for every title it matches."""
    return any(ch in "*?[" for ch in ae_title)


class PeerError(ValueError):
    """A peer specification that cannot be used."""


def validate_ae_title(title: str) -> str:
    """An AE title as PS3.5 allows it (1-16 chars, no backslash or controls, not all spaces)."""
    if not _AE_TITLE.match(title) or not title.strip():
        raise PeerError(f"invalid AE title {title!r}: 1-16 printable characters, no backslash")
    return title.strip()


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parses ``AET@HOST:PORT``; IPv6 hosts go in brackets."""
        match = _PEER.match(text.strip())
        if not match:
            raise PeerError(f"peer {text!r} is not AET@HOST:PORT")
        port = int(match["port"])
        if not 0 < port < 65536:
            raise PeerError(f"peer {text!r}: port out of range")
        host = match["host"].strip("[]")
        return cls(validate_ae_title(match["aet"]), host, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def calling_allow_list(peers: list[Peer], allowed: list[str], accept_any: bool) -> list[str] | None:
    """Calling AE titles to accept: peers plus extra callers; None means any.

    An empty list is refused, because pynetdicom reads an empty allow-list as "accept any".
    """
    if accept_any:
        return None
    titles = list(dict.fromkeys([*(p.ae_title for p in peers), *allowed]))
    if not titles:
        raise PeerError(
            "no caller would be accepted: configure --peer or --allow, or --accept-any-ae"
        )
    return titles


class PeerDirectory:
    """The configured peers: the only C-MOVE destinations and, by default, the only callers.

    A peer's AE title may be a pattern (``W01*@10.0.0.11:11112``): every device of one soak
    machine, served by that machine's shared receiver. An exact title wins over a pattern;
    patterns are tried in the order given.
    """

    def __init__(self, peers: list[Peer] | tuple[Peer, ...] = ()) -> None:
        self._by_title: dict[str, Peer] = {}
        for peer in peers:
            if peer.ae_title in self._by_title:
                raise PeerError(f"peer AE title {peer.ae_title} is configured twice")
            self._by_title[peer.ae_title] = peer
        self._patterns = [p for t, p in self._by_title.items() if is_pattern(t)]

    def get(self, ae_title: str) -> Peer | None:
        title = ae_title.strip()
        exact = self._by_title.get(title)
        if exact is not None and not is_pattern(title):
            return exact
        for peer in self._patterns:
            if fnmatch.fnmatchcase(title, peer.ae_title):
                return Peer(title, peer.host, peer.port)
        return None

    @property
    def ae_titles(self) -> list[str]:
        return list(self._by_title)

    def __iter__(self):
        return iter(self._by_title.values())

    def __len__(self) -> int:
        return len(self._by_title)
