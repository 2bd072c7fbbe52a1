"""Who the client of a request is: the peer's address, and what trusted proxies forwarded.

A request's ``client_ip`` is the address of the peer that connected (``scope["client"]``),
unless that peer is one of the proxies the application trusts
(``ContextMiddleware(trusted_proxies=...)``): then the proxies' forwarded header is read, the
way uvicorn's ``forwarded_allow_ips`` reads ``X-Forwarded-For``:

* Each proxy appends the address of the peer it saw, so the header is read **from the
  right**: the rightmost entry was written by our peer, the next one by the proxy that entry
  names, and so on. The walk goes on while the address it reached is a trusted proxy; the
  first address that is not one is the client. When every entry is a trusted proxy, the
  leftmost entry is the client (the client is itself one of the proxies).
* An entry that is not an IP address (``unknown``, an obfuscated ``_hidden``, garbage) ends
  the walk: the client is the last address it reached, the trusted proxy that wrote that
  entry. A value is never recorded as it came: only an address that parsed, in its canonical
  form (``2001:db8::1``; an IPv4-mapped IPv6 address as its IPv4; no zone id, no port).
* The walk reads at most :data:`MAX_FORWARDED_HOPS` entries of at most the last
  :data:`MAX_FORWARDED_BYTES` bytes of the header; when it reaches that bound it stops at the
  last address it reached. A header sent more than once is read as one list, in order.
* An untrusted peer's forwarded headers are never read: anyone can send them. A peer without
  an address (a unix socket) is trusted only with ``"*"``, which trusts every peer.

Exactly one header is read, the one the proxies write (``forwarded_header``):
``X-Forwarded-For`` (the default; nginx, HAProxy, the cloud load balancers) or RFC 7239
``Forwarded`` (its ``for=`` parameters: ``for=192.0.2.60``, ``for="[2001:db8::1]:4711"``).
The other header reaches the application as the client sent it, so reading it as well would
let any client choose its own address.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

from ._memo import remember
from .errors import ConfigurationError

__all__ = [
    "FORWARDED_HEADERS",
    "MAX_FORWARDED_BYTES",
    "MAX_FORWARDED_HOPS",
    "TrustedProxies",
    "canonical_ip",
    "forwarded_for",
    "header_values",
    "parse_address",
    "x_forwarded_for",
]

#: The most entries of a forwarded header the walk reads.
MAX_FORWARDED_HOPS = 16
#: The walk reads at most this many bytes from the end of a forwarded header.
MAX_FORWARDED_BYTES = 1024
#: The longest text that can be an address with its port (``[IPv6]:65535`` and a zone id).
_MAX_ADDRESS_LENGTH = 64

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_IPV4_PORT = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3}):(?:\d{1,5}|_[A-Za-z0-9._-]+)")
_BRACKETED = re.compile(r"\[([0-9A-Fa-f:.]+(?:%[^\]]*)?)\](?::(?:\d{1,5}|_[A-Za-z0-9._-]+))?")
# RFC 7239: forwarded-pair = token "=" value, value = token / quoted-string. The unquoted value
# also takes ":" and "[]", which proxies send unquoted though the grammar wants them quoted.
_TCHAR = r"[!#$%&'*+.^_`|~0-9A-Za-z-]"
_PAIR = re.compile(rf'[ \t]*({_TCHAR}+)=("[^"\\]*"|(?:{_TCHAR}|[:\[\]])+)[ \t]*')

# Texts seen before, mapped to their canonical address (or None): peers come back request after
# request, and formatting an address costs more than the lookup.
_canonical: dict[str, str | None] = {}
_CANONICAL_MAX = 4096
# The longest forwarded header line whose client is remembered (a few hops; longer ones are
# walked every time, so the memo stays small).
_REMEMBERED_BYTES = 256


def parse_address(text: str) -> Address | None:
    """The address ``text`` names: an IPv4 or IPv6 address, bracketed or not, with or without
    a port; an IPv4-mapped IPv6 address as its IPv4; without its zone id. None otherwise."""
    if len(text) > _MAX_ADDRESS_LENGTH or not text.isascii():
        return None
    if text.startswith("["):
        match = _BRACKETED.fullmatch(text)
        if match is None or ":" not in match.group(1):  # brackets are for IPv6 only
            return None
        text = match.group(1)
    elif text.count(":") == 1:
        match = _IPV4_PORT.fullmatch(text)
        if match is None:
            return None
        text = match.group(1)
    if "%" in text:  # an IPv6 zone id: anything may follow it, and it says nothing here
        text = text.partition("%")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def canonical_ip(value: object) -> str | None:
    """``value`` as a canonical IP address (see :func:`parse_address`), or None when it
    names none. Remembered (bounded) for the next request."""
    if type(value) is not str:
        return None
    try:
        return _canonical[value]
    except KeyError:
        address = parse_address(value)
        ip = None if address is None else str(address)
        return remember(_canonical, value, ip, _CANONICAL_MAX)


def _tail(values: list[bytes]) -> list[bytes]:
    """The entries of a forwarded header sent as ``values`` (one per header line) that the
    walk reads, rightmost last: at most :data:`MAX_FORWARDED_HOPS`, all within the last
    :data:`MAX_FORWARDED_BYTES` (an entry cut by that bound is left out)."""
    raw = values[0] if len(values) == 1 else b",".join(values)
    cut = len(raw) > MAX_FORWARDED_BYTES
    if cut:
        raw = raw[-MAX_FORWARDED_BYTES:]
    entries = raw.rsplit(b",", MAX_FORWARDED_HOPS)
    if cut or len(entries) > MAX_FORWARDED_HOPS:
        del entries[0]  # a cut entry, or the rest that is not read
    return entries


def x_forwarded_for(entry: bytes) -> str | None:
    """The address of one ``X-Forwarded-For`` entry (``203.0.113.7``, ``2001:db8::1``,
    ``[2001:db8::1]:443``, ``203.0.113.7:5060``), canonical, or None."""
    return canonical_ip(entry.strip(b" \t").decode("latin-1"))


def forwarded_for(element: bytes) -> str | None:
    """The address in the ``for=`` parameter of one RFC 7239 ``Forwarded`` element
    (``for=192.0.2.60;proto=https``, ``for="[2001:db8::1]:4711"``), canonical, or None: also
    for an element that is malformed, has no ``for`` or more than one, or names ``unknown``
    or an obfuscated node."""
    found = None
    for pair in element.decode("latin-1").split(";"):
        match = _PAIR.fullmatch(pair)
        if match is None:
            return None
        if match.group(1).lower() == "for":
            if found is not None:
                return None
            found = match.group(2)
    if found is None:
        return None
    if found.startswith('"'):
        found = found[1:-1]
    return canonical_ip(found)


def header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The values of header ``name`` sent more than once, in order: only the last lines, up
    to the one that crosses :data:`MAX_FORWARDED_BYTES` in all (the walk reads no more)."""
    values = [value for key, value in headers if key == name]
    kept: list[bytes] = []
    size = 0
    for value in reversed(values):
        kept.append(value)
        size += len(value) + 1
        if size > MAX_FORWARDED_BYTES:
            break
    kept.reverse()
    return kept


#: The headers ``forwarded_header`` may name (lowercase), and how one entry of each is read.
FORWARDED_HEADERS = {"x-forwarded-for": x_forwarded_for, "forwarded": forwarded_for}


class TrustedProxies:
    """The proxies whose forwarded header is believed, and the client they name.

    ``proxies``: IP addresses and networks (as strings like ``"10.0.0.1"`` or
    ``"10.0.0.0/8"``, or :mod:`ipaddress` objects); ``"*"`` trusts every peer. ``header``:
    the forwarded header the proxies write (see the module docstring). A bad value raises
    :class:`ConfigurationError`. Addresses are passed in and handed back canonical (see
    :func:`canonical_ip`).
    """

    __slots__ = ("_clients", "_entry", "_trusted", "addresses", "always", "header", "networks")

    def __init__(self, proxies: Iterable[Any], header: str = "X-Forwarded-For") -> None:
        if isinstance(proxies, (str, bytes)) or not isinstance(proxies, Iterable):
            raise ConfigurationError(
                "trusted_proxies must be a collection of addresses and networks, "
                "e.g. ['10.0.0.0/8'] or ['*'], not one value"
            )
        if not isinstance(header, str) or header.lower() not in FORWARDED_HEADERS:
            raise ConfigurationError("forwarded_header must be 'X-Forwarded-For' or 'Forwarded'")
        #: The forwarded header read, lowercase, as ASGI gives header names.
        self.header = header.lower().encode("ascii")
        self._entry = FORWARDED_HEADERS[header.lower()]
        self.always = False
        addresses: set[str] = set()
        networks: list[Network] = []
        for item in proxies:
            if item == "*":
                self.always = True
            elif isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                networks.append(item)
            else:
                addresses.add(_proxy_address(item, networks))
        addresses.discard("")
        self.addresses = frozenset(addresses)
        self.networks = tuple(networks)
        self._trusted: dict[str, bool] = {}
        # The client of each (peer, header line) seen before: a client's requests come
        # through the same proxies with the same header, and the walk costs more than this.
        self._clients: dict[tuple[str | None, bytes], str | None] = {}

    def __bool__(self) -> bool:
        """True when any proxy is trusted (else forwarded headers are never read)."""
        return self.always or bool(self.addresses) or bool(self.networks)

    def trusts(self, ip: str | None) -> bool:
        """True when the canonical address ``ip`` (None: a peer without one) is a trusted
        proxy."""
        if self.always:
            return True
        if ip is None:
            return False
        try:
            return self._trusted[ip]
        except KeyError:
            trusted = ip in self.addresses
            if not trusted and self.networks:
                address = ipaddress.ip_address(ip)
                trusted = any(address in network for network in self.networks)
            return remember(self._trusted, ip, trusted, _CANONICAL_MAX)

    def client(self, peer: str | None, values: list[bytes]) -> str | None:
        """The client of a request from the trusted ``peer`` whose forwarded header came as
        ``values`` (one per header line): see the module docstring. Remembered (bounded)
        for a header sent once."""
        if len(values) == 1 and len(values[0]) <= _REMEMBERED_BYTES:
            key = (peer, values[0])
            try:
                return self._clients[key]
            except KeyError:
                return remember(self._clients, key, self.walk(peer, values), _CANONICAL_MAX)
        return self.walk(peer, values)

    def walk(self, peer: str | None, values: list[bytes]) -> str | None:
        """:meth:`client`, worked out: the forwarded entries read from the right."""
        entries = _tail(values)
        entry = self._entry
        client = peer
        for raw in reversed(entries):
            ip = entry(raw)
            if ip is None:
                break
            client = ip
            if not self.trusts(ip):
                break
        return client


def _proxy_address(item: object, networks: list[Network]) -> str:
    """A ``trusted_proxies`` entry: its canonical address, or "" after adding a network."""
    if isinstance(item, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        item = str(item)
    if not isinstance(item, str):
        raise ConfigurationError("trusted_proxies entries must be addresses, networks or '*'")
    if "/" in item:
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError:
            pass
        else:
            return ""
    else:
        address = parse_address(item)
        if address is not None:
            return str(address)
    raise ConfigurationError(
        f"trusted_proxies: {item!r} is not an IP address or network "
        "(a network's host bits must be zero, as in 10.0.0.0/8)"
    )
