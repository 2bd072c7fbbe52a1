"""Id generation, id validation, IdRules and W3C traceparent parsing (ctxvars_mw.ids)."""

from __future__ import annotations

import os
import re
import sys
import threading
import warnings
from collections.abc import Callable

import pytest

from ctxvars_mw import ConfigurationError, IdRules, set_id_rules, use_id_rules
from ctxvars_mw.ids import (
    HEADER_ID_RE,
    MAX_ID_LENGTH,
    generate_id,
    generate_ids,
    get_id_rules,
    is_valid_id,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


def test_generate_id_is_24_lowercase_hex_and_unique() -> None:
    """Generated ids are 24 lowercase hex characters and do not repeat."""
    ids = [generate_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_generate_ids_gives_three_distinct_ids() -> None:
    """generate_ids returns three different 24-character ids."""
    first, second, third = generate_ids()
    assert len({first, second, third}) == 3
    assert all(len(i) == 24 and is_valid_id(i) for i in (first, second, third))


def _in_forked_child(draw: Callable[[], str]) -> str:
    """What ``draw()`` returns in a forked child (which leaves at once)."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():  # 3.12+ warns when forking with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report and leave at once
        os.close(read_end)
        os.write(write_end, draw().encode())
        os._exit(0)
    os.close(write_end)
    reported = os.read(read_end, 256).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    return reported


@pytest.mark.skipif(sys.platform == "win32", reason="os.fork is POSIX only")
def test_forked_child_generates_different_ids() -> None:
    """After fork the child's generator is reseeded, so parent and child ids differ."""
    child_id = _in_forked_child(generate_id)
    assert len(child_id) == 24
    assert child_id != generate_id()


def test_ids_stay_unique_across_pool_refills() -> None:
    """Ids come from pools refilled in batches: many triples and singles never repeat."""
    ids = [i for _ in range(1_000) for i in (*generate_ids(), generate_id())]
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_threads_never_get_the_same_id() -> None:
    """Threads drawing ids at once (and refilling the pools) never share one."""
    results: list[list[str]] = [[] for _ in range(8)]

    def draw(out: list[str]) -> None:
        for _ in range(500):
            out.extend(generate_ids())
            out.append(generate_id())

    threads = [threading.Thread(target=draw, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [i for out in results for i in out]
    assert len(ids) == 8 * 500 * 4
    assert len(set(ids)) == len(ids)


@pytest.mark.skipif(sys.platform == "win32", reason="os.fork is POSIX only")
@pytest.mark.parametrize("draw", [generate_id, lambda: ",".join(generate_ids())])
def test_forked_child_does_not_reuse_the_parents_pooled_ids(draw: Callable[[], str]) -> None:
    """Ids already drawn into the pool before a fork are not handed out by the child too."""
    draw()  # the pool now holds ids the parent will hand out next
    child_ids = _in_forked_child(draw)
    assert child_ids
    assert child_ids != draw()


@pytest.mark.parametrize(
    "value",
    ["user_2hNqYf3kT9xWzL", "auth0|5f7c8ec7c33c6c004bbafe82", "a", "default_user", "x" * 256],
)
def test_is_valid_id_accepts_real_ids(value: str) -> None:
    """Real ids, short or long, are valid."""
    assert is_valid_id(value)


@pytest.mark.parametrize(
    "value",
    ["", " x", "x ", "a\nb", "a\x00b", "x" * (MAX_ID_LENGTH + 1), "test", "NULL", "demo_1"],
)
def test_is_valid_id_refuses_bad_ids(value: str) -> None:
    """Empty, padded, non-printable, overlong and placeholder ids are invalid."""
    assert not is_valid_id(value)


@pytest.mark.parametrize("value", [None, 5, b"bytes", ["list"], {"k": "v"}])
def test_is_valid_id_is_false_for_non_strings(value: object) -> None:
    """Non-string values, hashable or not, are simply invalid (no exception)."""
    assert is_valid_id(value) is False  # type: ignore[arg-type]


def test_is_valid_id_answers_per_rules_even_after_caching() -> None:
    """An id accepted under one set of rules is re-checked under others."""
    assert is_valid_id("acme_42")
    stricter = IdRules.default().forbidding("acme_")
    assert not is_valid_id("acme_42", stricter)
    with use_id_rules(stricter):
        assert not is_valid_id("acme_42")
    assert is_valid_id("acme_42")


def test_validation_cache_stays_bounded_and_correct() -> None:
    """Validating many distinct ids keeps answering correctly past the cache's size."""
    ids = [f"user-{i:06d}-bounded" for i in range(5000)]
    assert all(is_valid_id(i) for i in ids)
    assert all(is_valid_id(i) for i in ids[:10])
    assert not is_valid_id("test")


def test_default_rules_are_a_shared_immutable_value() -> None:
    """IdRules.default() is the same frozen value each time."""
    rules = IdRules.default()
    assert rules is IdRules.default()
    with pytest.raises(AttributeError):
        rules.exact = frozenset()  # type: ignore[misc]


def test_allowing_and_forbidding_return_new_rules() -> None:
    """allowing/forbidding leave the original rules unchanged."""
    rules = IdRules.default()
    relaxed = rules.allowing("test", "mock_")
    assert rules.is_placeholder("test")
    assert not relaxed.is_placeholder("test")
    assert not relaxed.is_placeholder("mock_1")
    assert relaxed.is_placeholder("fake_1")
    strict = rules.forbidding("Guest", "acme_")
    assert strict.is_placeholder("GUEST")
    assert strict.is_placeholder("ACME_1")
    assert not strict.is_placeholder("acme_" + "1" * 15)
    assert not rules.is_placeholder("guest")


def test_rules_built_directly_are_normalized() -> None:
    """IdRules built from any iterables in any case compare case-insensitively."""
    rules = IdRules(exact=["Guest"], prefixes=(p for p in ["Acme_"]), allowed={"ACME_OK"})
    assert rules.exact == frozenset({"guest"})
    assert rules.prefixes == ("acme_",)
    assert rules.is_placeholder("GUEST")
    assert rules.is_placeholder("acme_1")
    assert not rules.is_placeholder("acme_ok")
    assert not rules.is_placeholder("test")


@pytest.mark.parametrize("bad", ["guest", 5, [""], ["ok", 3], None])
def test_rules_built_directly_refuse_bad_items(bad: object) -> None:
    """A field that is not a collection of non-empty strings raises ConfigurationError."""
    with pytest.raises(ConfigurationError):
        IdRules(exact=bad, prefixes=(), allowed=frozenset())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        IdRules(exact=frozenset(), prefixes=bad, allowed=frozenset())  # type: ignore[arg-type]


def test_forbidding_an_allowed_exception_refuses_it() -> None:
    """A default_… exception can be forbidden again."""
    rules = IdRules.default()
    assert not rules.is_placeholder("default_user")
    assert rules.forbidding("default_user").is_placeholder("default_user")
    assert rules.is_placeholder("default_thing")


@pytest.mark.parametrize("item", ["", "   ", 5, None])
def test_rule_items_must_be_non_empty_strings(item: object) -> None:
    """allowing/forbidding refuse empty or non-string items with ConfigurationError."""
    with pytest.raises(ConfigurationError):
        IdRules.default().allowing(item)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        IdRules.default().forbidding(item)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [None, "rules", {"exact": []}])
def test_use_and_set_id_rules_take_only_id_rules(value: object) -> None:
    """Passing something other than IdRules is a TypeError, and nothing changes."""
    with pytest.raises(TypeError):
        set_id_rules(value)  # type: ignore[arg-type]
    with pytest.raises(TypeError), use_id_rules(value):  # type: ignore[arg-type]
        pass
    assert get_id_rules() is IdRules.default()


def test_rules_are_never_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No environment variable changes the rules."""
    for name in ("CTXVARS_ID_RULES", "CTXVARS_MW_ALLOW_PLACEHOLDERS", "ALLOW_TEST_IDS"):
        monkeypatch.setenv(name, "test,demo,1")
    assert get_id_rules() is IdRules.default()
    assert not is_valid_id("test")


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        (b"abc", True),
        (b"A.b_c:d-e", True),
        (b"x" * 128, True),
        (b"x" * 129, False),
        (b"", False),
        (b"a b", False),
        (b"a\r\nb", False),
        (b"abc\n", False),
        (b"caf\xc3\xa9", False),
        (b"a/b", False),
    ],
)
def test_header_id_pattern(raw: bytes, ok: bool) -> None:
    """Header ids must be 1 to 128 characters of ``[A-Za-z0-9._:-]``."""
    assert (HEADER_ID_RE.fullmatch(raw) is not None) is ok


@pytest.mark.parametrize(
    ("raw", "accepted"),
    [
        (b"0f8fad5b-d9cb-469f-a165-70867728950e", "0f8fad5b-d9cb-469f-a165-70867728950e"),
        (b"A.b_c:d-e", "A.b_c:d-e"),
        (b"x" * 128, "x" * 128),
        (None, None),
        (b"", None),
        (b"x" * 129, None),
        (b"a b", None),
        (b"caf\xc3\xa9", None),
        (b"test", None),
        (b"TEMP", None),
        (b"demo_1", None),
    ],
)
def test_accept_header_id_takes_well_formed_real_ids_only(
    raw: bytes | None, accepted: str | None
) -> None:
    """An incoming id header is accepted when it matches the header rule and is no placeholder."""
    from ctxvars_mw.ids import accept_header_id

    assert accept_header_id(raw, get_id_rules()) == accepted


def test_accept_header_id_follows_the_rules_in_force() -> None:
    """An id the current rules allow is accepted; one they forbid is refused."""
    from ctxvars_mw.ids import accept_header_id

    assert accept_header_id(b"demo", IdRules.default().allowing("demo")) == "demo"
    assert accept_header_id(b"tenant_x", IdRules.default().forbidding("tenant_")) is None


def test_generate_id_pair_gives_two_distinct_new_ids() -> None:
    """A request's thread and run ids are distinct, 24 hex characters, never repeated."""
    from ctxvars_mw.ids import generate_id_pair

    seen: set[str] = set()
    for _ in range(1000):
        first, second = generate_id_pair()
        assert re.fullmatch(r"[0-9a-f]{24}", first)
        assert re.fullmatch(r"[0-9a-f]{24}", second)
        seen.update((first, second))
    assert len(seen) == 2000
