"""The qsvd torch decoder: bit-identical factors to numpy's ``to_factors`` on every layout and width, on the
file path (staged slots) and for in-memory records; ``apply`` of a qsvd file equals numpy's ΔW."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import adapterpack  # noqa: E402
import adapterpack.torch as apt  # noqa: E402
from adapterpack.errors import RecordError  # noqa: E402
from adapterpack.torch import decoders  # noqa: E402
from tools.vectors import qsvd as qsvd_vectors  # noqa: E402


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_decoder_bit_identical_to_numpy(tmp_path: Path, codec: str) -> None:
    assert decoders.get_torch_decoder("qsvd") is decoders.qsvd.decode_qsvd
    path = tmp_path / "q.apack"
    adapterpack.save(qsvd_vectors.adapter(), path, codec=codec)
    ref = adapterpack.open(path)
    got = apt.load(path)
    for name, m in ref.modules.items():
        f, lt = m.factors(), got[name]
        assert (lt.layout, lt.transpose, lt.scale) == (f.layout, f.transpose, 1.0)
        assert lt.A.dtype == torch.float32 and lt.B.dtype == torch.float32
        assert _bits(lt.A) == np.ascontiguousarray(f.A).tobytes(), name
        assert _bits(lt.B) == np.ascontiguousarray(f.B).tobytes(), name
        np.testing.assert_allclose(apt.materialize(lt).numpy(), m.delta(), rtol=1e-6, atol=1e-7)


def test_in_memory_records_and_rank_prefix(tmp_path: Path) -> None:
    ad = qsvd_vectors.adapter()
    for name, m in ad.modules.items():
        lt = decoders.decode(m, torch.device("cpu"), None)
        assert _bits(lt.A) == m.factors().A.tobytes(), name
    path = tmp_path / "q.apack"
    adapterpack.save(ad, path, codec="raw")
    got = apt.load(path, rank=3)
    with adapterpack.open(path, rank=3) as ref:
        for name, m in ref.modules.items():
            assert got[name].rank == min(3, ad.modules[name].params["rank"])
            assert _bits(got[name].B) == m.factors().B.tobytes()


def test_decoder_refuses_bad_values() -> None:
    m = qsvd_vectors.adapter().modules["model.layers.0.self_attn.k_proj"]
    data = m.tensors["data"].copy()
    data[6:8] = np.frombuffer(np.array([np.nan], "<f2").tobytes(), np.uint8)  # component 0's second scale
    m.tensors["data"] = data
    with pytest.raises(RecordError, match="scales"):
        decoders.decode(m, torch.device("cpu"), None)
    m = qsvd_vectors.adapter().modules["model.layers.0.self_attn.k_proj"]
    m.tensors["data"] = m.tensors["data"][:-1]
    with pytest.raises(RecordError, match="data"):
        decoders.decode(m, torch.device("cpu"), None)


def test_apply_matches_numpy_delta(tmp_path: Path) -> None:
    ad = qsvd_vectors.adapter()
    lin = {
        n: m for n, m in ad.modules.items() if m.params.get("layout", "linear") == "linear" and not m.params.get("fan_in_fan_out")
    }
    model = torch.nn.Module()
    for i, m in enumerate(lin.values()):
        model.add_module(f"l{i}", torch.nn.Linear(m.base_shape[1], m.base_shape[0], bias=False))
    names = {n: f"l{i}" for i, n in enumerate(lin)}
    sub = adapterpack.Adapter(name="default", modules={names[n]: replace(m, name=names[n]) for n, m in lin.items()})
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = tmp_path / "q.apack"
    adapterpack.save(sub, path)
    applied = apt.apply(model, path, merge=True)
    for n, mod_name in names.items():
        got = model.state_dict()[f"{mod_name}.weight"] - before[f"{mod_name}.weight"]
        np.testing.assert_allclose(got.numpy(), lin[n].delta(), rtol=0, atol=1e-6)
    applied.unapply()


def test_a_huge_group_size_decodes_without_a_huge_repeat() -> None:
    from adapterpack.encodings import qsvd as Q

    m = qsvd_vectors.adapter().modules["model.layers.0.self_attn.k_proj"]
    u = np.linalg.qr(np.random.default_rng(0).standard_normal((33, 3)))[0]
    vt = np.linalg.qr(np.random.default_rng(1).standard_normal((50, 3)))[0].T
    rec = Q.encode_qsvd(u, np.array([3.0, 2.0, 1.0]), vt, [2, 5, 1], Q.MAX_GROUP_SIZE, template=m)
    lt = decoders.decode(rec, torch.device("cpu"), None)
    assert _bits(lt.A) == rec.factors().A.tobytes() and _bits(lt.B) == rec.factors().B.tobytes()
