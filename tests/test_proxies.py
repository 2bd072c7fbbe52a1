"""ctxvars_mw.proxies: addresses, forwarded headers, and the client trusted proxies name."""

from __future__ import annotations

import ipaddress
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctxvars_mw import ConfigurationError
from ctxvars_mw.proxies import (
    MAX_FORWARDED_BYTES,
    MAX_FORWARDED_HOPS,
    TrustedProxies,
    canonical_ip,
    forwarded_for,
    header_values,
    x_forwarded_for,
)

# -- addresses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("203.0.113.7:5060", "203.0.113.7"),
        ("2001:DB8::1", "2001:db8::1"),
        ("2001:db8:0:0:0:0:0:1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:4711", "2001:db8::1"),
        ("[2001:db8::1]:_port", "2001:db8::1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("[::ffff:10.0.0.1]:80", "10.0.0.1"),
        ("fe80::1%eth0", "fe80::1"),
        ("fe80::1%\n injected", "fe80::1"),
        ("::1", "::1"),
    ],
)
def test_an_address_is_recorded_in_its_canonical_form(text: str, expected: str) -> None:
    """Ports, brackets, zone ids and IPv4 mapping are stripped; IPv6 is compressed lowercase."""
    assert canonical_ip(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unknown",
        "_hidden",
        "testclient",
        "localhost",
        "203.0.113.7 ",
        " 203.0.113.7",
        "203.0.113",
        "203.0.113.256",
        "01.2.3.4",
        "203.0.113.7:",
        "203.0.113.7:port",
        "203.0.113.7:123456",
        "[203.0.113.7]",
        "[2001:db8::1",
        "2001:db8::1]",
        "[2001:db8::1]x",
        "[2001:db8::1]:",
        "2001:db8::1:4711:x",
        "١.٢.٣.٤",
        "1" * 10_000,
        "203.0.113.7\r\nX-Evil: 1",
    ],
)
def test_a_value_that_names_no_address_is_none(text: str) -> None:
    """Anything that is not an IP address (with at most a port) is refused, never kept."""
    assert canonical_ip(text) is None


def test_a_value_that_is_not_a_string_names_no_address() -> None:
    """A server that puts something odd in ``scope["client"]`` gets None, not a crash."""
    for value in (None, 1234, b"203.0.113.7", ipaddress.ip_address("203.0.113.7")):
        assert canonical_ip(value) is None


@given(st.ip_addresses())
def test_every_address_parses_to_its_canonical_form_which_parses_to_itself(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    """Any IPv4/IPv6 address, as text, bracketed or with a port, gives the same canonical
    value, which is a fixed point (the context's constructor accepts what the reader makes)."""
    expected = address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        expected = address.ipv4_mapped
    canonical = canonical_ip(str(address))
    assert canonical == str(expected)
    assert canonical_ip(canonical) == canonical
    if address.version == 6:
        assert canonical_ip(f"[{address}]:443") == canonical
    else:
        assert canonical_ip(f"{address}:443") == canonical


@given(st.text(max_size=80))
def test_canonical_ip_of_any_text_is_an_address_or_none(text: str) -> None:
    """Whatever the text, the result is None or a valid address (never the text itself,
    unless that is already canonical)."""
    result = canonical_ip(text)
    if result is not None:
        assert str(ipaddress.ip_address(result)) == result
        assert result.isascii()
        assert result.isprintable()


# -- one entry of each header --------------------------------------------------------------


def test_x_forwarded_for_entries_are_stripped_and_parsed() -> None:
    """An X-Forwarded-For entry may carry spaces around it, brackets and a port."""
    assert x_forwarded_for(b" 203.0.113.7 ") == "203.0.113.7"
    assert x_forwarded_for(b"\t[2001:db8::1]:443") == "2001:db8::1"
    assert x_forwarded_for(b"unknown") is None
    assert x_forwarded_for(b"") is None
    assert x_forwarded_for("203.0.113.7".encode("utf-16")) is None


@pytest.mark.parametrize(
    ("element", "expected"),
    [
        (b"for=192.0.2.60", "192.0.2.60"),
        (b"for=192.0.2.60;proto=http;by=203.0.113.43", "192.0.2.60"),
        (b"proto=https; For=192.0.2.60", "192.0.2.60"),
        (b'for="192.0.2.60:4711"', "192.0.2.60"),
        (b'for="[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17"),
        (b'for="[2001:db8:cafe::17]"', "2001:db8:cafe::17"),
        (b" for=192.0.2.60 ", "192.0.2.60"),
    ],
)
def test_forwarded_for_reads_the_for_parameter(element: bytes, expected: str) -> None:
    """RFC 7239's examples: ``for`` in any case and position, quoted or not, with a port."""
    assert forwarded_for(element) == expected


@pytest.mark.parametrize(
    "element",
    [
        b"for=unknown",
        b"for=_hidden",
        b'for="_SEVKISEK"',
        b'for="[2001:db8::1]:_port"x',
        b"proto=https",
        b"",
        b"for=192.0.2.60;for=198.51.100.1",
        b"for=",
        b'for="192.0.2.60',
        b'for="192.0.2.60\\"',
        b"for 192.0.2.60",
        b"for=192.0.2.60;garbage",
        b"for=192.0.2.60\r\nx",
        b"f\xc3\xb6r=192.0.2.60",
    ],
)
def test_a_forwarded_element_that_names_no_address_is_none(element: bytes) -> None:
    """Obfuscated or unknown nodes, a missing or repeated ``for``, broken quoting or syntax."""
    assert forwarded_for(element) is None


# -- trusted proxies and the walk ----------------------------------------------------------


def proxies(*items: object, header: str = "X-Forwarded-For") -> TrustedProxies:
    return TrustedProxies(items, header)


def test_addresses_and_networks_in_every_form_are_trusted() -> None:
    """Strings, networks, ipaddress objects and IPv4-mapped spellings all configure trust."""
    trusted = proxies(
        "10.0.0.0/8",
        "192.0.2.1",
        "::ffff:198.51.100.9",
        "2001:db8::/32",
        ipaddress.ip_network("172.16.0.0/12"),
        ipaddress.ip_address("203.0.113.1"),
    )
    for ip in ("10.1.2.3", "192.0.2.1", "198.51.100.9", "2001:db8::5", "172.20.0.1", "203.0.113.1"):
        assert trusted.trusts(ip), ip
    for ip in ("11.0.0.1", "192.0.2.2", "2001:db9::1", "203.0.113.2", None):
        assert not trusted.trusts(ip), ip
    assert trusted


def test_star_trusts_every_peer_even_one_without_an_address() -> None:
    """``"*"`` trusts any address, and a peer without one (a unix socket)."""
    trusted = proxies("*")
    assert trusted.trusts("203.0.113.9")
    assert trusted.trusts(None)
    assert not proxies()
    assert not proxies().trusts("127.0.0.1")


@pytest.mark.parametrize(
    "value",
    [
        "10.0.0.1",
        b"10.0.0.1",
        10,
        ["10.0.0.0/33"],
        ["10.0.0.1/8"],
        ["not-an-address"],
        ["localhost"],
        [None],
        [10],
    ],
)
def test_a_bad_trusted_proxies_value_is_a_configuration_error(value: object) -> None:
    """One string (not a collection), a bad address or network, a network with host bits."""
    with pytest.raises(ConfigurationError, match="trusted_proxies"):
        TrustedProxies(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("header", ["X-Real-IP", "", "X-Forwarded-Host", None])
def test_a_bad_forwarded_header_is_a_configuration_error(header: object) -> None:
    """Only X-Forwarded-For and Forwarded can be read."""
    with pytest.raises(ConfigurationError, match="forwarded_header"):
        TrustedProxies(["10.0.0.1"], header)  # type: ignore[arg-type]


def test_the_forwarded_header_name_is_case_insensitive() -> None:
    """``forwarded_header`` is matched without regard to case, and read lowercase."""
    assert TrustedProxies([], "forwarded").header == b"forwarded"
    assert TrustedProxies([], "X-FORWARDED-FOR").header == b"x-forwarded-for"


LB = "10.0.0.5"  # the peer: our load balancer
TRUSTED = proxies("10.0.0.0/8")


@pytest.mark.parametrize(
    ("values", "client"),
    [
        ([b"203.0.113.7"], "203.0.113.7"),
        ([b"203.0.113.7, 10.0.0.9"], "203.0.113.7"),
        ([b"198.51.100.1, 203.0.113.7, 10.0.0.9"], "203.0.113.7"),  # the left one is a claim
        ([b"10.0.0.7, 10.0.0.8"], "10.0.0.7"),  # every hop trusted: the leftmost
        ([b"203.0.113.7, unknown"], LB),  # our proxy does not know: its peer, our LB
        ([b"203.0.113.7, 10.0.0.9, _hidden"], LB),
        ([b"unknown, 10.0.0.9"], "10.0.0.9"),  # the trusted hop that wrote "unknown"
        ([b"203.0.113.7,,10.0.0.9"], "10.0.0.9"),
        ([b""], LB),
        ([b"198.51.100.1", b"203.0.113.7"], "203.0.113.7"),  # two lines read as one list
        ([b"203.0.113.7", b"10.0.0.9"], "203.0.113.7"),
        ([b"[2001:db8::1]:443, 10.0.0.9"], "2001:db8::1"),
    ],
)
def test_the_client_is_the_first_untrusted_hop_from_the_right(
    values: list[bytes], client: str
) -> None:
    """X-Forwarded-For is walked right to left past trusted proxies; an entry that is no
    address ends the walk at the last address reached."""
    assert TRUSTED.client(LB, values) == client


def test_with_star_the_client_is_the_leftmost_entry() -> None:
    """Trusting every peer, as uvicorn's ``forwarded_allow_ips="*"``, takes the leftmost."""
    assert proxies("*").client(None, [b"198.51.100.1, 203.0.113.7"]) == "198.51.100.1"
    assert proxies("*").client(None, [b"garbage"]) is None


def test_a_header_seen_before_names_the_same_client_for_each_peer() -> None:
    """The client of a forwarded header line seen before is remembered per peer: asked again,
    each peer gets what walking the header gives it (here "unknown" names no one, so each
    trusted peer is its own client)."""
    proxies = TrustedProxies(["10.0.0.0/8"])
    for _ in range(3):
        assert proxies.client("10.0.0.1", [b"unknown"]) == "10.0.0.1"
        assert proxies.client("10.0.0.2", [b"unknown"]) == "10.0.0.2"
        assert proxies.client("10.0.0.1", [b"203.0.113.7, 10.0.0.9"]) == "203.0.113.7"
    long_line = b"10.0.0.3, " * 40 + b"203.0.113.8, 10.0.0.9"
    for _ in range(2):
        assert proxies.client("10.0.0.1", [long_line]) == "203.0.113.8"
        assert proxies.walk("10.0.0.1", [long_line]) == "203.0.113.8"


@pytest.mark.parametrize(
    ("value", "client"),
    [
        (b"for=203.0.113.7", "203.0.113.7"),
        (b'for=198.51.100.1, for="[2001:db8::1]:4711", for=10.0.0.9;proto=https', "2001:db8::1"),
        (b"for=203.0.113.7, for=unknown", LB),
        (b'for="203.0.113.7, for=10.0.0.9"', LB),  # a comma inside quotes breaks both halves
        (b"for=203.0.113.7, proto=https", LB),  # our proxy named no client
        (b"203.0.113.7", LB),  # X-Forwarded-For syntax is not a Forwarded element
    ],
)
def test_forwarded_is_walked_the_same_way(value: bytes, client: str) -> None:
    """RFC 7239 elements are walked like X-Forwarded-For entries, by their ``for=``."""
    assert proxies("10.0.0.0/8", header="Forwarded").client(LB, [value]) == client


def test_the_walk_reads_at_most_the_hop_bound_and_stops_at_the_last_trusted_hop() -> None:
    """A chain of trusted hops longer than MAX_FORWARDED_HOPS ends at the last one read."""
    hops = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(MAX_FORWARDED_HOPS + 5)]
    value = ", ".join(["203.0.113.7", *hops]).encode()
    assert TRUSTED.client(LB, [value]) == hops[-MAX_FORWARDED_HOPS]
    exact = ", ".join(hops[-MAX_FORWARDED_HOPS:]).encode()
    assert TRUSTED.client(LB, [exact]) == hops[-MAX_FORWARDED_HOPS]


def test_the_walk_never_reads_an_entry_cut_by_the_byte_bound() -> None:
    """An entry that straddles the last MAX_FORWARDED_BYTES is left out, not half-read."""
    padding = b"203.0.113.77" + b" " * (MAX_FORWARDED_BYTES - len(b"203.0.113.77") - 5)
    value = b"10.0.0.1, " + padding + b", 10.0.0.9"
    assert len(value) > MAX_FORWARDED_BYTES
    # "203.0.113.77" now starts before the bound: it would read as "03.0.113.77" or so.
    assert TRUSTED.client(LB, [value]) == "10.0.0.9"


def test_a_huge_or_much_repeated_header_costs_little() -> None:
    """A megabyte header, or thousands of header lines, are read within the bounds: fast."""
    huge = b"10.0.0.1, " * 100_000
    lines = [(b"x-forwarded-for", b"10.0.0.1")] * 20_000
    start = time.perf_counter()
    for _ in range(50):
        TRUSTED.client(LB, [huge])
        TRUSTED.client(LB, header_values(lines, b"x-forwarded-for"))
    assert time.perf_counter() - start < 2.0
    assert len(header_values(lines, b"x-forwarded-for")) <= MAX_FORWARDED_BYTES // 8 + 1


def test_header_values_keeps_the_order_and_only_the_last_lines() -> None:
    """Repeated header lines are kept in order, from the end, up to the one that crosses
    the byte bound (the walk cuts that one)."""
    lines = [(b"x-forwarded-for", b"1.1.1.1"), (b"other", b"x"), (b"x-forwarded-for", b"2.2.2.2")]
    assert header_values(lines, b"x-forwarded-for") == [b"1.1.1.1", b"2.2.2.2"]
    values = [b"a" * 600, b"b" * 600, b"c" * 600, b"d" * 10]
    long = [(b"forwarded", value) for value in values]
    assert header_values(long, b"forwarded") == values[1:]


@given(st.lists(st.one_of(st.ip_addresses().map(str), st.text(max_size=20)), max_size=40))
def test_the_client_is_always_the_peer_or_an_address_from_the_header(entries: list[str]) -> None:
    """Whatever a trusted proxy forwards, the client is the peer or a canonical address that
    appears in the header: never a raw value."""
    value = ",".join(entries).encode("utf-8")
    for trusted in (TRUSTED, proxies("*")):
        client = trusted.client(LB, [value])
        if client is not None and client != LB:
            assert str(ipaddress.ip_address(client)) == client
            assert client in {canonical_ip(e.strip(" \t")) for e in ",".join(entries).split(",")}
