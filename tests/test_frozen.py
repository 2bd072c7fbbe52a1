"""Deep-frozen metadata values (ctxvars_mw.frozen)."""

from __future__ import annotations

import copy
import enum
import json
import pickle
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from ctxvars_mw.frozen import EMPTY, FrozenMap, freeze, freeze_mapping, thaw


def test_freeze_turns_containers_immutable() -> None:
    """Dicts become FrozenMap, lists and tuples tuples, sets sorted tuples; scalars stay."""
    frozen = freeze({"a": [1, {"b": {2, 1}}], "c": (3,), "d": None, "e": 1.5, "f": True})
    assert isinstance(frozen, FrozenMap)
    assert frozen["a"] == (1, FrozenMap({"b": (1, 2)}))
    assert frozen["c"] == (3,)
    assert frozen["d"] is None
    assert frozen["f"] is True


def test_freeze_keeps_already_frozen_maps() -> None:
    """A FrozenMap inside a value is immutable already, so it is reused, not copied."""
    inner = FrozenMap({"k": [1]})
    assert freeze({"inner": inner})["inner"] is inner
    assert freeze(inner) is inner


def test_freeze_copies_deeply() -> None:
    """The frozen value shares nothing with the source."""
    inner = [1, 2]
    source = {"list": inner, "map": {"k": inner}}
    frozen = freeze(source)
    inner.append(3)
    source["map"]["new"] = 1
    assert frozen["list"] == (1, 2)
    assert dict(frozen["map"]) == {"k": (1, 2)}


@pytest.mark.parametrize(
    "value", [b"bytes", object(), {1: "int key"}, {"k": {2.0: "x"}}, {"k": [b"x"]}]
)
def test_freeze_refuses_non_json_values(value: Any) -> None:
    """Anything that is not JSON-like raises TypeError naming where it was."""
    with pytest.raises(TypeError):
        freeze(value)


class Color(enum.StrEnum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 2


class Settings(Mapping[str, Any]):
    """A Mapping that is not a dict (the ABC path)."""

    def __init__(self, **data: Any) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_scalar_subclasses_and_non_dict_mappings_take_the_slow_path_correctly() -> None:
    """Exact-type fast paths aside, str/int subclasses are kept, other Mappings frozen, and a
    bad value inside a list inside a custom Mapping is still refused."""
    frozen = freeze_mapping(
        Settings(color=Color.RED, level=Level.HIGH, nested=Settings(items=[1, {"k": "v"}]))
    )
    assert frozen["color"] is Color.RED
    assert frozen["level"] is Level.HIGH
    assert frozen["nested"] == FrozenMap({"items": (1, FrozenMap({"k": "v"}))})
    assert isinstance(frozen["nested"]["items"][1], FrozenMap)
    assert freeze([Color.RED, (Level.HIGH,)]) == (Color.RED, (Level.HIGH,))
    with pytest.raises(TypeError, match=r"outer\.inner"):
        freeze_mapping(Settings(outer=Settings(inner=[1, b"raw"])))
    with pytest.raises(TypeError):
        freeze_mapping(OrderedDict([(1, "int key")]))


def test_error_names_the_path() -> None:
    """The TypeError says which key held the bad value, but not the value itself."""
    with pytest.raises(TypeError, match=r"outer\.inner") as info:
        freeze({"outer": {"inner": b"secret-bytes"}})
    assert "secret-bytes" not in str(info.value)


def test_frozen_map_is_a_read_only_mapping() -> None:
    """FrozenMap reads like a dict and refuses every write."""
    fm = FrozenMap({"a": 1, "b": [2]})
    assert fm["a"] == 1
    assert "b" in fm
    assert "z" not in fm
    assert len(fm) == 2
    assert sorted(fm) == ["a", "b"]
    assert fm.get("z", 9) == 9
    assert fm == {"a": 1, "b": (2,)}
    assert fm != {"a": 1}
    assert fm != [("a", 1)]
    with pytest.raises(TypeError):
        fm["c"] = 3  # type: ignore[index]
    with pytest.raises(AttributeError):
        fm._data = {}  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del fm._data
    assert "FrozenMap" in repr(fm)


def test_frozen_map_is_hashable_and_hash_is_stable() -> None:
    """Equal frozen maps hash alike, whatever the insertion order."""
    first = FrozenMap({"a": 1, "b": {"c": [1, 2]}})
    second = FrozenMap(OrderedDict([("b", {"c": (1, 2)}), ("a", 1)]))
    assert first == second
    assert hash(first) == hash(second) == hash(first)
    assert len({first, second}) == 1


def test_merged_lays_extra_over_and_leaves_both_unchanged() -> None:
    """merged() returns a new map; neither input changes; empty extra returns self."""
    base = FrozenMap({"a": 1, "b": 2})
    extra = {"b": 3, "c": [4]}
    merged = base.merged(extra)
    assert dict(merged) == {"a": 1, "b": 3, "c": (4,)}
    assert dict(base) == {"a": 1, "b": 2}
    assert extra == {"b": 3, "c": [4]}
    assert base.merged({}) is base
    assert base.merged(None) is base
    assert dict(base.merged(FrozenMap({"d": 5}))) == {"a": 1, "b": 2, "d": 5}


def test_thaw_gives_plain_json_data() -> None:
    """thaw() returns dicts and lists that json can dump and that equal the source."""
    source = {"a": [1, {"b": [2, 3]}], "c": "x", "s": ["p", "q"]}
    plain = thaw(freeze(source))
    assert plain == source
    assert type(plain) is dict
    assert type(plain["a"]) is list
    assert type(plain["a"][1]) is dict
    assert json.loads(json.dumps(plain)) == source


def test_freeze_mapping_shares_the_empty_map() -> None:
    """None and empty mappings become the shared EMPTY; non-mappings are refused."""
    assert freeze_mapping(None) is EMPTY
    assert freeze_mapping({}) is EMPTY
    fm = FrozenMap({"a": 1})
    assert freeze_mapping(fm) is fm
    with pytest.raises(TypeError):
        freeze_mapping([("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        freeze_mapping([])  # type: ignore[arg-type]


def test_frozen_map_pickles_and_copies() -> None:
    """FrozenMap survives pickle and copy as an equal map."""
    fm = FrozenMap({"a": [1, {"b": 2}]})
    assert pickle.loads(pickle.dumps(fm)) == fm
    assert copy.deepcopy(fm) == fm
    assert copy.copy(fm) == fm


def _nested_claims() -> dict[str, Any]:
    return {
        "sub": "auth0|5f7c8ec7c33c6c004bbafe82",
        "realm_access": {"roles": ["user", "admin"]},
        "resource_access": {"api": {"roles": ["reader"]}},
        "https://example.com/meta": {"plan": "gold", "flags": [True, None, 1.5]},
    }


def test_frozen_values_serialize_with_json_dumps_as_they_are() -> None:
    """json.dumps takes a FrozenMap with nested maps and tuples, and dict(fm) too."""
    frozen = freeze(_nested_claims())
    assert json.loads(json.dumps(frozen)) == _nested_claims()
    assert json.loads(json.dumps(dict(frozen))) == _nested_claims()
    assert json.loads(json.dumps(frozen, indent=2, sort_keys=True)) == _nested_claims()
    assert json.dumps(EMPTY) == "{}"


def test_context_claims_serialize_with_json_jsonable_encoder_and_to_dict() -> None:
    """A context's nested claims go through json.dumps, FastAPI's jsonable_encoder and
    to_dict() alike, with the same plain result."""
    from fastapi.encoders import jsonable_encoder

    from ctxvars_mw import UserExecutionContext

    ctx = UserExecutionContext(user_id="auth0|5f7c8ec7c33c6c004bbafe82", claims=_nested_claims())
    expected = _nested_claims()
    assert json.loads(json.dumps(dict(ctx.claims))) == expected
    assert json.loads(json.dumps(ctx.claims)) == expected
    assert jsonable_encoder(ctx.claims) == expected
    assert jsonable_encoder({"claims": ctx.claims}) == {"claims": expected}
    assert ctx.to_dict()["claims"] == expected
    assert json.loads(ctx.to_json())["claims"] == expected


def test_frozen_map_is_a_dict_whose_mutators_raise() -> None:
    """isinstance(fm, dict) holds, and every dict mutator raises (TypeError and
    AttributeError both catch it); the map is unchanged afterwards."""
    fm = FrozenMap({"a": 1, "n": {"k": [1]}})
    assert isinstance(fm, dict)
    writes = [
        lambda: fm.__setitem__("b", 2),
        lambda: fm.__delitem__("a"),
        lambda: fm.update({"b": 2}),
        lambda: fm.update(b=2),
        lambda: fm.setdefault("b", 2),
        lambda: fm.pop("a"),
        lambda: fm.pop("zz", None),
        lambda: fm.popitem(),
        lambda: fm.clear(),
        lambda: fm.__ior__({"b": 2}),
        lambda: fm.__init__({"b": 2}),  # type: ignore[misc]
        lambda: fm["n"].update({"x": 1}),
    ]
    for write in writes:
        with pytest.raises(TypeError):
            write()
        with pytest.raises(AttributeError):
            write()
    with pytest.raises(TypeError):
        fm |= {"b": 2}  # type: ignore[misc]
    assert fm == {"a": 1, "n": {"k": (1,)}}
    assert type(fm | {"b": 2}) is dict  # a new plain dict; fm is unchanged
    assert "b" not in fm


def test_frozen_map_copies_are_the_same_object_or_plain_dicts() -> None:
    """copy/deepcopy of an immutable map return it; fm.copy() and dict(fm) are plain dicts."""
    fm = FrozenMap({"a": {"b": 1}})
    assert copy.copy(fm) is fm
    assert copy.deepcopy(fm) is fm
    plain = fm.copy()
    assert type(plain) is dict
    plain["c"] = 1
    assert "c" not in fm
