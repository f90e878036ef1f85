"""Third-party codecs, encodings and torch decoders through entry points (adapterpack/plugins.py).

Each test installs a fake distribution in a temporary folder on ``sys.path`` (a ``*.dist-info``
folder with ``entry_points.txt``, beside the plugin's module), as pip would.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import adapterpack
import adapterpack.torch as apt
from adapterpack import codecs, encodings
from adapterpack.adapter import Adapter, Module
from adapterpack.codecs import base as codec_base
from adapterpack.codecs.zstd import Zstd
from adapterpack.encodings import base as encoding_base
from adapterpack.encodings.lora import Lora
from adapterpack.errors import AdapterpackError, UnknownCodecError, UnknownEncodingError
from adapterpack.plugins import PluginError, Registry
from adapterpack.torch import decoders
from adapterpack.torch.decoders import base as decoder_base
from tests.test_cli import assert_one_line_error, run

REPO = Path(__file__).resolve().parents[1]

ZLIB_CODEC = """
import zlib

from adapterpack.codecs import Codec, register_codec
from adapterpack.errors import CodecError


@register_codec
class Zlib(Codec):
    codec_id = "x-zlib"

    def __init__(self, level: int = 6, wbits: int = 15) -> None:
        self.level = level
        self.wbits = wbits

    def encode(self, data, itemsize):
        c = zlib.compressobj(self.level, wbits=self.wbits)
        return c.compress(data) + c.flush()

    def check(self, stored, length, itemsize):
        if not len(stored):
            raise CodecError("x-zlib: empty")

    def decode_into(self, stored, out, itemsize):
        d = zlib.decompressobj(wbits=self.wbits)
        data = d.decompress(stored, len(out))
        if len(data) != len(out) or not d.eof or d.unused_data:
            raise CodecError("x-zlib: wrong size")
        out[:] = data

    def max_expansion(self):
        return 1032
"""

DENSE_ENCODING = '''
from typing import ClassVar

import numpy as np

from adapterpack.encodings import Encoding, Factors
from adapterpack.errors import RecordError


class Dense(Encoding):
    """ΔW stored whole (not registered here: the entry point names the class)."""

    encoding_id = "x-dense"
    slots: ClassVar[dict[str, bool]] = {"delta": True}

    def validate(self, module):
        if set(module.tensors) != {"delta"} or tuple(module.tensors["delta"].shape) != tuple(module.base_shape):
            raise RecordError(f"module {module.name!r}: x-dense needs one tensor 'delta' of the base shape")

    def to_factors(self, module):
        d = module.array("delta")
        return Factors(A=np.eye(d.shape[1], dtype=d.dtype), B=d, scale=1.0, base_shape=tuple(module.base_shape))


def decode_dense(module, device, dtype):
    import torch

    from adapterpack.factors import Factors

    d = torch.from_numpy(np.array(module.array("delta"))).to(device, dtype)
    eye = torch.eye(d.shape[1], dtype=d.dtype, device=device)
    return Factors(A=eye, B=d, scale=1.0, base_shape=tuple(module.base_shape))
'''

REGISTRIES: list[Registry] = [codec_base._REGISTRY, encoding_base._REGISTRY, decoder_base._REGISTRY]


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    """Each test reads the entry points afresh and leaves the registries and sys.modules as it found them."""
    for r in REGISTRIES:
        r.load_builtins()  # built-ins imported during a test would otherwise be dropped by the restore below
    saved = [dict(r) for r in REGISTRIES]
    modules = set(sys.modules)
    for r in REGISTRIES:
        r.forget_plugins()
    yield
    for r, s in zip(REGISTRIES, saved):
        dict.clear(r)
        dict.update(r, s)
        r.forget_plugins()
        r._from_plugins.clear()
    for name in set(sys.modules) - modules:
        if name.startswith("xplug_"):
            del sys.modules[name]


def install(
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    entry_points: dict[str, dict[str, str]],
    modules: dict[str, str],
    name: str = "xplug",
) -> None:
    """A distribution ``name`` 1.0 in ``root`` (put on sys.path) with these entry points and modules."""
    info = root / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for group, eps in entry_points.items())
    )
    for mod, source in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(root))


def _compressible(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).integers(-4, 4, shape) / 4).astype(np.float32)


# --- codecs ----------------------------------------------------------------------------------------


def test_plugin_codec_is_loaded_on_first_lookup_and_round_trips_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(tmp_path, monkeypatch, {"adapterpack.codecs": {"x-zlib": "xplug_zlib"}}, {"xplug_zlib": ZLIB_CODEC})
    assert "x-zlib" not in codecs.codec_ids() and "xplug_zlib" not in sys.modules  # nothing loaded yet
    assert "x-zlib" in codecs.codec_ids(plugins=True) and "xplug_zlib" not in sys.modules  # listed, still not loaded
    codec = codecs.get_codec({"id": "x-zlib", "level": 9, "must_understand": True})
    assert "xplug_zlib" in sys.modules and "x-zlib" in codecs.codec_ids()
    assert codec.get_config() == {"id": "x-zlib", "level": 9, "wbits": 15}  # config from the base class, by introspection
    assert repr(codec) == "Zlib(level=9, wbits=15)" and codec == codecs.get_codec(codec.get_config())

    a = Module("m", "lora", (64, 32), {"rank": 4, "alpha": 8}, {"A": _compressible((4, 32), 1), "B": _compressible((64, 4), 2)})
    path = tmp_path / "z.apack"
    adapterpack.save(Adapter(modules={"m": a}), path, codec="x-zlib", level=9)
    with adapterpack.open(path) as back:
        stored = back.modules["m"].tensors["A"]
        assert stored.codec == "x-zlib"
        np.testing.assert_array_equal(back.modules["m"].array("A"), a.tensors["A"])
        np.testing.assert_array_equal(back.modules["m"].delta(), a.delta())


def test_plugin_codec_class_named_by_the_entry_point_is_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = ZLIB_CODEC.replace("@register_codec\n", "")
    install(tmp_path, monkeypatch, {"adapterpack.codecs": {"x-zlib": "xplug_zlib2:Zlib"}}, {"xplug_zlib2": source})
    assert codecs.base.is_known("x-zlib")
    data = _compressible((100, 10), 3).tobytes()
    c = codecs.get_codec("x-zlib")
    assert bytes(c.decode_new(memoryview(c.encode(memoryview(data), 4)), len(data), 4)) == data


def test_unknown_id_without_a_plugin_is_still_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(tmp_path, monkeypatch, {"adapterpack.codecs": {"x-zlib": "xplug_zlib"}}, {"xplug_zlib": ZLIB_CODEC})
    with pytest.raises(UnknownCodecError, match="unknown codec 'lz4'"):
        codecs.get_codec("lz4")
    assert not codecs.base.is_known("lz4") and "xplug_zlib" not in sys.modules  # only the id asked for is loaded


@pytest.mark.parametrize(
    ("target", "source", "needle"),
    [
        (
            "xplug_bad",
            "raise RuntimeError('no GPU here')\n",
            "failed to load (entry point 'x-bad = xplug_bad' in group adapterpack.codecs, "
            "from xplug 1.0): RuntimeError: no GPU here",
        ),
        ("xplug_missing_module_name", None, "failed to load (entry point 'x-bad = xplug_missing_module_name'"),
        ("xplug_bad:Nope", "X = 1\n", "AttributeError"),
        (
            "xplug_bad",
            "X = 1\n",
            "entry point 'x-bad = xplug_bad' in group adapterpack.codecs, from xplug 1.0 did not provide codec 'x-bad'",
        ),
    ],
)
def test_a_broken_plugin_is_an_adapterpack_error_naming_its_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, source: str | None, needle: str
) -> None:
    install(tmp_path, monkeypatch, {"adapterpack.codecs": {"x-bad": target}}, {} if source is None else {"xplug_bad": source})
    for _ in range(2):  # the second lookup gives the same error, without importing again
        with pytest.raises(PluginError) as info:
            codecs.get_codec("x-bad")
        assert needle in str(info.value) and isinstance(info.value, AdapterpackError)
    with pytest.raises(PluginError, match="x-bad"):
        codecs.base.is_known("x-bad")
    assert codecs.get_codec("zstd") == Zstd()  # other ids are unaffected


def test_cli_reports_a_broken_plugin_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose codec comes from a plugin that fails to import: one line naming the entry point, no traceback."""
    ns: dict = {}
    exec(ZLIB_CODEC, ns)  # registered directly, to write the file
    path = tmp_path / "z.apack"
    a = Module("m", "lora", (64, 32), {"rank": 4, "alpha": 8}, {"A": _compressible((4, 32), 1), "B": _compressible((64, 4), 2)})
    adapterpack.save(Adapter(modules={"m": a}), path, codec="x-zlib")
    del codec_base._REGISTRY["x-zlib"]
    install(
        tmp_path / "d", monkeypatch, {"adapterpack.codecs": {"x-zlib": "xplug_broken"}}, {"xplug_broken": "import xplug_nothing\n"}
    )
    r = run("inspect", path)
    assert_one_line_error(r, "codec plugin 'x-zlib' failed to load (entry point 'x-zlib = xplug_broken'")


# --- no hijacking ------------------------------------------------------------------------------------


def test_a_plugin_named_after_a_built_in_id_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(tmp_path, monkeypatch, {"adapterpack.codecs": {"zstd": "xplug_zstd:Zlib"}}, {"xplug_zstd": ZLIB_CODEC})
    assert type(codecs.get_codec("zstd")) is Zstd  # a built-in id never reads the entry points
    with pytest.raises(PluginError, match=r"entry point 'zstd = xplug_zstd:Zlib' .* names the registered codec 'zstd'"):
        codecs.get_codec("lz4")  # reading them refuses the plugin, loudly
    assert type(codecs.get_codec("zstd")) is Zstd and "xplug_zstd" not in sys.modules


def test_a_plugin_cannot_replace_a_built_in_while_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evil_codec = ZLIB_CODEC.replace('codec_id = "x-zlib"', 'codec_id = "zstd"')
    evil_encoding = DENSE_ENCODING.replace('encoding_id = "x-dense"', 'encoding_id = "lora"') + (
        "\nfrom adapterpack.encodings import register_encoding\nregister_encoding(Dense)\n"
    )
    evil_decoder = (
        "from adapterpack.torch.decoders import register_torch_decoder\n"
        "register_torch_decoder('x-evil')(lambda *a: None)\nregister_torch_decoder('lora')(lambda *a: None)\n"
    )
    install(
        tmp_path,
        monkeypatch,
        {
            "adapterpack.codecs": {"x-evil": "xplug_evil_codec"},
            "adapterpack.encodings": {"x-evil": "xplug_evil_encoding"},
            "adapterpack.torch_decoders": {"x-evil": "xplug_evil_decoder"},
        },
        {"xplug_evil_codec": evil_codec, "xplug_evil_encoding": evil_encoding, "xplug_evil_decoder": evil_decoder},
    )
    lora_decoder = decoder_base._REGISTRY["lora"]
    with pytest.raises(
        PluginError, match=r"entry point 'x-evil = xplug_evil_codec' .* tried to replace the registered codec 'zstd'"
    ):
        codecs.get_codec("x-evil")
    with pytest.raises(PluginError, match=r"tried to replace the registered encoding 'lora'"):
        encodings.get_encoding("x-evil")
    with pytest.raises(PluginError, match=r"tried to replace the registered torch decoder 'lora'"):
        decoders.is_staged("x-evil")
    assert type(codecs.get_codec("zstd")) is Zstd
    assert type(encodings.get_encoding("lora")) is Lora
    assert decoder_base._REGISTRY["lora"] is lora_decoder


def test_two_plugins_offering_one_id_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(tmp_path / "a", monkeypatch, {"adapterpack.codecs": {"x-zlib": "xplug_a"}}, {"xplug_a": ZLIB_CODEC}, name="xplug_a")
    install(tmp_path / "b", monkeypatch, {"adapterpack.codecs": {"x-zlib": "xplug_b"}}, {"xplug_b": ZLIB_CODEC}, name="xplug_b")
    with pytest.raises(PluginError, match="codec 'x-zlib' is offered by more than one plugin") as info:
        codecs.get_codec("x-zlib")
    assert "'x-zlib = xplug_a' in group adapterpack.codecs, from xplug_a 1.0" in str(info.value)
    assert "'x-zlib = xplug_b' in group adapterpack.codecs, from xplug_b 1.0" in str(info.value)


# --- encodings and their torch decoders -----------------------------------------------------------


def _dense_adapter() -> Adapter:
    d = _compressible((6, 5), 4)
    return Adapter(modules={"m": Module("m", "x-dense", (6, 5), {}, {"delta": d})})


def test_plugin_encoding_and_torch_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(
        tmp_path,
        monkeypatch,
        {
            "adapterpack.encodings": {"x-dense": "xplug_dense:Dense"},
            "adapterpack.torch_decoders": {"x-dense": "xplug_dense:decode_dense"},
        },
        {"xplug_dense": DENSE_ENCODING},
    )
    assert "x-dense" not in encodings.encoding_ids() and "x-dense" in encodings.encoding_ids(plugins=True)
    path = tmp_path / "d.apack"
    adapterpack.save(_dense_adapter(), path)  # the writer validates the record through the plugin
    assert encodings.is_known("x-dense") and type(encodings.get_encoding("x-dense")).__name__ == "Dense"
    with adapterpack.open(path) as back:
        np.testing.assert_array_equal(back.modules["m"].delta(), _dense_adapter().modules["m"].tensors["delta"])
        assert decoders.get_torch_decoder("x-dense") is sys.modules["xplug_dense"].decode_dense
        assert not decoders.is_staged("x-dense")
        f = decoders.decode(back.modules["m"], torch.device("cpu"), None)
        np.testing.assert_array_equal(apt.materialize(f).numpy(), back.modules["m"].delta())


def test_plugin_encoding_without_a_torch_decoder_uses_the_numpy_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(tmp_path, monkeypatch, {"adapterpack.encodings": {"x-dense": "xplug_dense:Dense"}}, {"xplug_dense": DENSE_ENCODING})
    assert decoders.get_torch_decoder("x-dense") is decoders.numpy_fallback
    f = decoders.decode(_dense_adapter().modules["m"], torch.device("cpu"), None)
    np.testing.assert_array_equal(apt.materialize(f).numpy(), _dense_adapter().modules["m"].tensors["delta"])
    with pytest.raises(UnknownEncodingError, match="unknown encoding 'x-none'"):
        decoders.get_torch_decoder("x-none")


# --- laziness --------------------------------------------------------------------------------------


def test_entry_points_are_not_read_at_import_nor_for_built_in_ids() -> None:
    code = (
        "import adapterpack, adapterpack.torch\n"
        "from adapterpack.codecs import base as c\nfrom adapterpack.encodings import base as e\n"
        "from adapterpack.torch.decoders import base as d\nfrom adapterpack.examples import example_path\n"
        "a = adapterpack.open(example_path()); [m.delta() for m in a.modules.values()]; adapterpack.torch.load(example_path())\n"
        "print([r._entry_points is None for r in (c._REGISTRY, e._REGISTRY, d._REGISTRY)])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[True, True, True]"


def test_builtin_encodings_are_found_by_module_name_only() -> None:
    """A built-in encoding is its module adapterpack/encodings/<id>.py, imported on first lookup; any other
    module of that package (a helper) or a name that is no module is an unknown encoding, not an import."""
    from adapterpack.errors import UnknownEncodingError

    assert encodings.get_encoding("svd").encoding_id == "svd"
    for bad in ("base", "lower", "nola_fit", "../lora", "Lora", "lora.x", "x" * 65, ""):
        with pytest.raises(UnknownEncodingError, match="unknown encoding"):
            encodings.get_encoding(bad)
