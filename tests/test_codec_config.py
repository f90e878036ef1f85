"""Codec config, ``==`` and ``repr`` come from the base class, by introspection of ``__init__`` (numcodecs style)."""

from __future__ import annotations

from typing import Any

import pytest

from adapterpack import codecs
from adapterpack.codecs.byteplanes import BytePlanes
from adapterpack.codecs.raw import Raw
from adapterpack.codecs.zstd import Zstd
from adapterpack.errors import IndexFormatError


def test_eq_repr_hash() -> None:
    assert Zstd() == Zstd(3) == codecs.get_codec({"id": "zstd", "level": 3}) and hash(Zstd()) == hash(Zstd(3))
    assert Zstd(3) != Zstd(4) and Zstd(1) != BytePlanes(1) and Raw() == Raw() and Raw() != "raw"
    assert [repr(c) for c in (Raw(), Zstd(19), BytePlanes())] == ["Raw()", "Zstd(level=19)", "BytePlanes(level=1)"]
    assert len({Zstd(), Zstd(3), BytePlanes(3), Raw()}) == 3


class _Two(codecs.Codec):
    codec_id = "x-test-two"

    def __init__(self, key: int, scale: float = 1.0, *, name: str = "a") -> None:
        self.key, self.scale, self.name = key, scale, name


def test_config_keys_follow_the_signature() -> None:
    assert _Two(5).get_config() == {"id": "x-test-two", "key": 5, "scale": 1.0, "name": "a"}
    assert list(_Two(5).get_config()) == ["id", "key", "scale", "name"]  # the order of the index object
    back = _Two.from_config({"id": "x-test-two", "key": 7, "scale": 2, "name": 3, "other": 1})
    assert (back.key, back.scale, back.name) == (7, 2, "a")  # an int is a float; a wrong type takes the default
    assert back == _Two.from_config(back.get_config()) and repr(back) == "_Two(key=7, scale=2, name='a')"
    with pytest.raises(IndexFormatError, match="codec 'x-test-two': config needs 'key'"):
        _Two.from_config({"id": "x-test-two"})


@pytest.mark.parametrize("sig", ["self, *args", "self, **kw", "self, level, /", "self, id=1", "self, must_understand=True"])
def test_parameters_that_cannot_be_config_keys_are_refused(sig: str) -> None:
    ns: dict[str, Any] = {}
    exec(f"def __init__({sig}): pass", ns)
    with pytest.raises(TypeError, match="cannot be a codec config key"):
        type("Bad", (codecs.Codec,), {"codec_id": "x-bad", "__init__": ns["__init__"]})
