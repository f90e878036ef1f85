"""The vLLM resolver's decode-and-cache path, with a stand-in for vLLM (vLLM itself is not installable here)."""

from __future__ import annotations

import asyncio
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterpack
from adapterpack.examples import example_path
from adapterpack.formats import serving as targets
from adapterpack.formats import vllm_resolver
from adapterpack.formats.vllm_resolver import ApackResolver, register

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _request(name: str, int_id: int, path: str) -> dict[str, Any]:
    return {"lora_name": name, "lora_int_id": int_id, "lora_path": path}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    folder = tmp_path / "adapters"
    folder.mkdir()
    adapterpack.save(adapterpack.open(example_path()), folder / "pydoc.apack")
    return folder


def test_decodes_once_and_serves_the_same_tensors(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = targets.write_vllm

    def counting(*a: Any, **k: Any) -> Any:
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(targets, "write_vllm", counting)
    res = ApackResolver(store, tmp_path / "cache", make_request=_request)
    req = asyncio.run(res.resolve_lora(BASE, "pydoc"))
    folder = Path(req["lora_path"])
    assert req["lora_name"] == "pydoc" and req["lora_int_id"] > 0 and folder.parent == tmp_path / "cache"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # + card
    served, src = adapterpack.open(folder), adapterpack.open(example_path())
    for m in src:
        for slot in ("A", "B"):
            assert served.modules[m.name].array(slot).tobytes() == m.array(slot).tobytes()  # r=8 is a vLLM rank: nothing padded
    again = ApackResolver(store, tmp_path / "cache", make_request=_request)  # a new process: the cache on disk is reused
    assert asyncio.run(again.resolve_lora(BASE, "pydoc")) == req
    assert asyncio.run(res.resolve_lora(BASE, "pydoc")) == req
    assert len(calls) == 1
    # new content under the same name: a new folder, a new id
    ad = adapterpack.open(example_path())
    m = next(iter(ad))
    m.tensors["B"] = m.array("B") * np.float32(2)
    adapterpack.save(ad, store / "pydoc.apack")
    new = asyncio.run(again.resolve_lora(BASE, "pydoc"))
    assert new["lora_path"] != req["lora_path"] and len(calls) == 2


def test_not_ours_returns_none(store: Path, tmp_path: Path) -> None:
    res = ApackResolver(store, tmp_path / "cache", make_request=_request)
    assert asyncio.run(res.resolve_lora("meta-llama/Llama-2-7b-hf", "pydoc")) is None  # another base model
    for name in ("missing", "../adapters/pydoc", "pydoc.apack", ".hidden", ""):
        assert asyncio.run(res.resolve_lora(BASE, name)) is None
    (store / "broken.apack").write_bytes(b"not an apack file at all, but long enough to have a preamble")
    assert asyncio.run(res.resolve_lora(BASE, "broken")) is None
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_cache_folder_depends_on_the_rank_limit(store: Path, tmp_path: Path) -> None:
    """The r=8 example decoded without a limit, then for max_lora_rank=1 (a vLLM rank) on the same cache: a folder at rank 1
    (write_vllm re-ranks it), not the rank-8 folder vLLM would refuse."""
    import json

    def resolve(limit: int | None) -> dict[str, Any]:
        res = ApackResolver(store, tmp_path / "cache", max_lora_rank=limit, make_request=_request)
        return asyncio.run(res.resolve_lora(BASE, "pydoc"))

    wide, narrow = resolve(None), resolve(1)
    assert narrow["lora_path"] != wide["lora_path"]
    ranks = [json.loads((Path(r["lora_path"]) / "adapter_config.json").read_text())["r"] for r in (wide, narrow)]
    assert ranks == [8, 1]
    assert resolve(1) == narrow  # the same limit reuses its folder


def test_os_errors_give_none_and_a_warning(store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A cache path that cannot be a folder (here: a file) is an OSError while decoding: None, logged, as promised."""
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    res = ApackResolver(store, blocked, make_request=_request)
    with caplog.at_level("WARNING", logger=vllm_resolver.__name__):
        assert asyncio.run(res.resolve_lora(BASE, "pydoc")) is None
    assert any("cannot serve 'pydoc'" in r.getMessage() for r in caplog.records)
    assert blocked.read_text() == "a file where the cache folder should be"


def test_register_with_a_vllm_stand_in(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registered: dict[str, Any] = {}

    class LoRAResolver:  # the stand-in for vllm.lora.resolver
        pass

    class LoRAResolverRegistry:
        @staticmethod
        def register_resolver(name: str, resolver: Any) -> None:
            registered[name] = resolver

    fake = {
        "vllm": types.ModuleType("vllm"),
        "vllm.lora": types.ModuleType("vllm.lora"),
        "vllm.lora.resolver": types.ModuleType("vllm.lora.resolver"),
        "vllm.lora.request": types.ModuleType("vllm.lora.request"),
    }
    fake["vllm.lora.resolver"].LoRAResolver = LoRAResolver  # type: ignore[attr-defined]
    fake["vllm.lora.resolver"].LoRAResolverRegistry = LoRAResolverRegistry  # type: ignore[attr-defined]
    fake["vllm.lora.request"].LoRARequest = lambda **kw: kw  # type: ignore[attr-defined]
    for k, v in fake.items():
        monkeypatch.setitem(sys.modules, k, v)
    monkeypatch.delenv(vllm_resolver.ENV_DIR, raising=False)
    register()
    assert registered == {}  # not configured: nothing registered
    monkeypatch.setenv(vllm_resolver.ENV_DIR, str(store))
    monkeypatch.setenv(vllm_resolver.ENV_CACHE, str(tmp_path / "cache"))
    register()
    r = registered["adapterpack"]
    assert isinstance(r, LoRAResolver) and isinstance(r, ApackResolver)
    req = asyncio.run(r.resolve_lora(BASE, "pydoc"))
    assert req["lora_name"] == "pydoc" and Path(req["lora_path"]).parent == tmp_path / "cache"
    monkeypatch.setenv(vllm_resolver.ENV_DIR, str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="not a folder"):
        register()


def test_entry_point_is_declared() -> None:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    found = re.search(r'\[project\.entry-points\."vllm\.general_plugins"\]\n(?:#.*\n)*adapterpack = "([\w.]+):(\w+)"', text)
    assert found is not None
    module, func = found.groups()
    assert module == vllm_resolver.__name__ and getattr(vllm_resolver, func) is register
