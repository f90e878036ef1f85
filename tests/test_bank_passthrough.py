"""Banks keep every member's pass-through tensors (PEFT ``modules_to_save``): build, add, refit and
extract carry them bit for bit, each member reads only its own, listings show them, and what a
bank cannot hold (DoRA magnitudes) or an output cannot carry is refused or dropped only on request.

The adapters are real PEFT folders: LoRA on q/v of a tiny LLaMA built from a config (nothing
downloaded) with ``modules_to_save=["model.norm"]`` and a trained (random) norm weight.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import adapterpack
from adapterpack.bank import add_to_bank, bank_listing, build_bank, extract_member, read_bank, refit_bank, write_extracted
from adapterpack.cli import main
from adapterpack.errors import BankError, BankMismatchError, ConversionError
from adapterpack.formats.peft import read_peft, write_peft
from tests import apack_builders as ab
from tests.factories import qv_adapter
from tests.helpers_safetensors import bits, load_st

NORM = "base_model.model.model.norm.weight"
ST = "adapter_model.safetensors"


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)  # every adapter is for the same base model
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def make_peft(folder: Path, seed: int) -> Path:
    """A PEFT folder: LoRA r=4 on q/v, ``modules_to_save=["model.norm"]`` with a norm weight unlike the base's."""
    base = tiny_llama()
    torch.manual_seed(seed)
    targets = ["q_proj", "v_proj"]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["model.norm"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, cfg)
        with torch.no_grad():
            pm.base_model.model.model.norm.modules_to_save["default"].weight.normal_()
        pm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("peft")
    return [make_peft(root / f"a{i}", seed=i + 1) for i in range(3)]


def norm_of(folder: Path) -> np.ndarray:
    return load_st(folder / ST)[0][NORM]


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_member_tensors(bank: Path, name: str, folder: Path) -> None:
    """Member ``name`` holds exactly ``folder``'s pass-through tensor, bit for bit."""
    with adapterpack.open(bank, adapter=name) as a:
        assert list(a.tensors) == [NORM]
        assert bits(adapterpack.adapter.as_array(a.tensors[NORM])) == bits(norm_of(folder))


# --- the issue's scenario ------------------------------------------------------------------------------


def test_cli_build_then_extract_to_peft_keeps_the_trained_norm(folders: list[Path], tmp_path: Path) -> None:
    bank = tmp_path / "bank.apack"
    r = run("bank", "build", bank, *folders, "--rank", "4")
    assert r.exit_code == 0, r.output
    r = run("bank", "extract", bank, "a1", tmp_path / "x1", "--to", "peft")
    assert r.exit_code == 0, r.output
    st, _ = load_st(tmp_path / "x1" / ST)
    assert bits(st[NORM]) == bits(norm_of(folders[1]))
    assert f"pass-through tensors: {NORM}" in r.stdout
    assert json.loads((tmp_path / "x1" / "adapter_config.json").read_text())["modules_to_save"] == ["model.norm"]
    # PEFT itself loads the trained norm, not an untrained copy of the base's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(tiny_llama(), tmp_path / "x1")
    loaded = pm.base_model.model.model.norm.modules_to_save["default"].weight.detach().numpy()
    assert bits(loaded) == bits(norm_of(folders[1]))
    assert not np.array_equal(loaded, tiny_llama().model.norm.weight.detach().numpy())


@pytest.mark.parametrize("to", ["apack", "svd", "peft"])
def test_extract_carries_each_members_own_tensors(folders: list[Path], tmp_path: Path, to: str) -> None:
    bank = tmp_path / "bank.apack"
    build_bank(bank, folders, rank=4)
    for k, folder in enumerate(folders):
        ad, _ = extract_member(bank, f"a{k}")
        out = write_extracted(ad, tmp_path / (f"x{k}" + ("" if to == "peft" else ".apack")), to)
        if to == "peft":
            assert list(load_st(out / ST)[0]).count(NORM) == 1
            assert bits(load_st(out / ST)[0][NORM]) == bits(norm_of(folder))
        else:
            assert_member_tensors(out, f"a{k}", folder)


def test_each_member_reads_only_its_own_tensors(folders: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening one member and reading its ΔW and tensors (or extracting it) reads exactly its S and tensor blobs
    and the shared U, V: no other member's blob."""
    from adapterpack.container import ApackReader

    bank = tmp_path / "bank.apack"
    build_bank(bank, folders, rank=4)
    with ApackReader(bank) as reader:
        entries = {raw["name"]: raw for raw in reader.index.adapters}
    shared = {i for raw in entries.values() for m in raw["modules"] for slot, i in m["tensors"].items() if slot != "S"}
    read: list[int] = []
    for method in ("read_blob", "read_rows"):
        original = getattr(ApackReader, method)

        def spy(self: ApackReader, i: int, *rest: Any, _original: Callable[..., Any] = original) -> Any:
            read.append(i)
            return _original(self, i, *rest)

        monkeypatch.setattr(ApackReader, method, spy)
    for k, folder in enumerate(folders):
        raw = entries[f"a{k}"]
        own = {m["tensors"]["S"] for m in raw["modules"]} | {t["blob"] for t in raw["tensors"]}
        read.clear()
        with adapterpack.open(bank, adapter=f"a{k}") as a:
            assert bits(adapterpack.adapter.as_array(a.tensors[NORM])) == bits(norm_of(folder))
            for m in a:
                a.delta(m.name)
        assert set(read) == own | shared, f"a{k}"
        read.clear()
        extract_member(bank, f"a{k}")
        assert set(read) == own | shared, f"a{k}"
    assert len({bits(norm_of(f)) for f in folders}) == 3  # the members' norms do differ
    loaded = read_bank(bank)
    assert [list(m.tensors) for m in loaded.members] == [[NORM]] * 3


# --- memory: one member's pass-through tensors at a time ------------------------------------------------

N_HEAVY, HEAVY = 8, 1 << 19  # members, float32 elements of each one's pass-through tensor (2 MiB)
HEAD = "lm_head.weight"


@pytest.fixture(scope="module")
def heavy(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """.apack adapters each carrying a large pass-through tensor of its own (as a 7B ``lm_head`` would)."""
    root = tmp_path_factory.mktemp("heavy")
    out = []
    for k in range(N_HEAVY):
        ad = qv_adapter(20 + k, layers=1, rank=4, in_features=16, q_out=16, v_out=8, b_scale=0.1)
        ad.tensors[HEAD] = np.random.default_rng(k).standard_normal(HEAVY).astype(np.float32)
        adapterpack.save(ad, root / f"h{k}.apack")
        out.append(root / f"h{k}.apack")
    return out


def traced_peak(fn: Callable[[], object]) -> int:
    """Peak bytes that Python and numpy allocate while ``fn`` runs (mapped file pages are not counted)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("op", ["build", "add", "refit"])
def test_bank_writes_hold_one_members_tensors_at_a_time(heavy: list[Path], tmp_path: Path, op: str) -> None:
    """build, add and refit hash, read and write each member's pass-through tensors one at a time: the
    peak stays a few times one member's tensor, not the sum over members (which it was: all were kept
    from hashing to the write, and the writer held every encoded blob)."""
    bank = tmp_path / "bank.apack"
    if op != "build":
        build_bank(bank, heavy[:-1] if op == "add" else heavy, rank=2, codec="raw")
    run = {  # raw: the peak is this code's, not a compressor's buffers
        "build": lambda: build_bank(bank, heavy, rank=2, codec="raw"),
        "add": lambda: add_to_bank(bank, heavy[-1:], codec="raw"),
        "refit": lambda: refit_bank(bank, rank=2, codec="raw"),
    }[op]
    one = HEAVY * 4
    peak = traced_peak(run)
    # 2 × one: a tensor decoded from its input and its hash or write; 1 MiB: the bank itself (bases, S, index:
    # a few KiB here) and the fit's work
    assert peak < 2 * one + (1 << 20), f"peak {peak} bytes; one member's tensor is {one}, all {N_HEAVY * one}"
    for k, src in enumerate(heavy):
        with adapterpack.open(bank, adapter=f"h{k}") as got, adapterpack.open(src) as want:
            assert bits(adapterpack.adapter.as_array(got.tensors[HEAD])) == bits(adapterpack.adapter.as_array(want.tensors[HEAD]))


def test_add_and_refit_keep_every_members_tensors(folders: list[Path], tmp_path: Path) -> None:
    bank = tmp_path / "bank.apack"
    build_bank(bank, folders[:2], rank=2)
    rep = add_to_bank(bank, [folders[2]], threshold=0.0)
    assert [a["name"] for a in rep.added] == ["a2"]
    for k, folder in enumerate(folders):
        assert_member_tensors(bank, f"a{k}", folder)
    refit_bank(bank, out=tmp_path / "refit.apack", rank=3)
    for k, folder in enumerate(folders):
        assert_member_tensors(tmp_path / "refit.apack", f"a{k}", folder)


def test_same_factors_other_tensors_is_not_a_duplicate(folders: list[Path], tmp_path: Path) -> None:
    """The content hash covers pass-through tensors: an adapter that differs only in its norm is added, not skipped."""
    ad = read_peft(folders[0])
    ad.tensors[NORM] = np.asarray(ad.tensors[NORM]) + np.float32(1)
    other = write_peft(ad, tmp_path / "other")
    bank = tmp_path / "bank.apack"
    build_bank(bank, [folders[0], other], rank=4)  # not "identical"
    assert_member_tensors(bank, "other", other)
    one = tmp_path / "one.apack"
    build_bank(one, [folders[0]], rank=4)
    rep = add_to_bank(one, [other])
    assert [a["name"] for a in rep.added] == ["other"] and rep.skipped == []
    assert_member_tensors(one, "other", other)
    assert_member_tensors(one, "a0", folders[0])
    again = add_to_bank(one, [folders[0]])
    assert again.added == [] and len(again.skipped) == 1


def test_content_hash_is_the_specs(tmp_path: Path) -> None:
    """The hash recorded as ``bank.sha256`` is spec/shared.md §2's, byte for byte (banks written before keep
    recognising their members), computed here from the spec's words: modules, then ``\\0tensors\\0`` and the
    tensors sorted by name (a bf16 one included)."""
    ad = qv_adapter(9, layers=1, rank=4, in_features=16, q_out=16, v_out=8, b_scale=0.1)
    ad.tensors["z.norm"] = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    ad.tensors["a.head"] = np.arange(4, dtype=np.float32).astype(adapterpack.dtypes.by_name("bfloat16").numpy)
    adapterpack.save(ad, tmp_path / "h.apack")
    h = hashlib.sha256()
    for name in sorted(ad.modules):
        f = ad.modules[name].factors()
        h.update(name.encode() + b"\0" + repr((tuple(f.base_shape), bool(f.transpose), float(f.scale))).encode())
        for arr in (f.A, f.B):
            h.update(f"{arr.dtype.str}{arr.shape}".encode() + np.ascontiguousarray(arr).tobytes())
    h.update(b"\0tensors\0")
    for name in sorted(ad.tensors):
        arr = ad.tensors[name]
        h.update(name.encode() + b"\0" + f"{arr.dtype.str}{arr.shape}".encode() + arr.tobytes())
    build_bank(tmp_path / "bank.apack", [tmp_path / "h.apack"], rank=2)
    assert read_bank(tmp_path / "bank.apack").members[0].sha256 == h.hexdigest()


def test_listing_shows_tensors(folders: list[Path], tmp_path: Path) -> None:
    bank = tmp_path / "bank.apack"
    build_bank(bank, folders, rank=4)
    listing = bank_listing(bank)
    assert [m["tensors"] for m in listing["members"]] == [[NORM]] * 3
    s_bytes = {m.name: sum(s.nbytes for s in m.S.values()) for m in read_bank(bank).members}
    assert all(m["own_bytes"] == s_bytes[m["name"]] + norm_of(folders[0]).nbytes for m in listing["members"])
    r = run("bank", "list", bank)
    assert r.exit_code == 0, r.output
    assert f"a1 carries pass-through tensors: {NORM}" in r.stdout


# --- what cannot be carried ------------------------------------------------------------------------


def _kohya_with_extra(path: Path) -> tuple[Path, np.ndarray]:
    """A .apack adapter imported from kohya that carries one unknown key (PEFT cannot write it)."""
    ad = qv_adapter(3, layers=1, rank=4, in_features=16, q_out=16, v_out=8, b_scale=0.1)
    extra = np.arange(5, dtype=np.float32)
    ad.tensors["lora_te_text_model_extra"] = extra
    ad.source = {"format": "kohya"}
    adapterpack.save(ad, path)
    return path, extra


def test_extract_to_peft_refuses_foreign_tensors_unless_dropped(tmp_path: Path) -> None:
    src, extra = _kohya_with_extra(tmp_path / "k.apack")
    bank = tmp_path / "bank.apack"
    build_bank(bank, [src], rank=2)
    ad, _ = extract_member(bank, "k")
    assert bits(ad.tensors["lora_te_text_model_extra"]) == bits(extra)
    with pytest.raises(ConversionError, match="--drop-tensors"):
        write_extracted(ad, tmp_path / "p", "peft")
    assert not (tmp_path / "p").exists()
    r = run("bank", "extract", bank, "k", tmp_path / "p", "--to", "peft", "--drop-tensors")
    assert r.exit_code == 0, r.output
    assert "dropped on request: 1 pass-through tensors (lora_te_text_model_extra)" in r.stdout
    assert "lora_te_text_model_extra" not in load_st(tmp_path / "p" / ST)[0]
    r = run("bank", "extract", bank, "k", tmp_path / "k2.apack", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["tensors"] == ["lora_te_text_model_extra"]
    assert json.loads(r.stdout)["dropped_tensors"] == []
    r = CliRunner().invoke(main, ["bank", "extract", str(bank), "k", str(tmp_path / "k3.apack"), "--drop-tensors"])
    assert r.exit_code == 2 and "--drop-tensors applies to PEFT and kohya output only" in r.output


def test_dora_input_is_refused_naming_adapter_and_module(tmp_path: Path) -> None:
    ad = qv_adapter(4, layers=1, rank=4, in_features=16, q_out=16, v_out=8, b_scale=0.1)
    q = ad.modules["model.layers.0.self_attn.q_proj"]
    q.params["dora"] = True
    q.tensors["magnitude"] = np.ones(16, dtype=np.float32)
    adapterpack.save(ad, tmp_path / "dora.apack")
    out = tmp_path / "bank.apack"
    with pytest.raises(BankMismatchError, match=r"adapter 'dora' module 'model\.layers\.0\.self_attn\.q_proj': DoRA"):
        build_bank(out, [tmp_path / "dora.apack"], rank=2)
    assert not out.exists()


def test_skipped_records_of_an_input_are_reported(tmp_path: Path) -> None:
    """A record the reader skips (optional, unknown encoding) cannot go into the bank: the report says so."""
    parts = ab.valid_parts(tmp_path, adapter=qv_adapter(5, layers=1, rank=4, in_features=16, q_out=16, v_out=8, b_scale=0.1))
    rec = parts.index["adapters"][0]["modules"][1]
    rec["encoding"], rec["must_understand"] = "future_encoding", False
    src = ab.write(tmp_path / "f.apack", parts.build())
    rep = build_bank(tmp_path / "bank.apack", [src], rank=2)
    assert rep.left_out == [f"adapter 'f': module {rec['name']!r}: encoding 'future_encoding' not understood, skipped"]


def test_torch_bank_refuses_a_member_with_tensors(folders: list[Path], tmp_path: Path) -> None:
    from adapterpack.torch.bank import TorchBank

    bank = tmp_path / "bank.apack"
    build_bank(bank, folders[:2], rank=4)
    with TorchBank(bank) as tb:
        with pytest.raises(BankError, match=f"adapter 'a0' holds 1 full tensors besides its S .*{NORM}"):
            tb.use(["a0"])


def test_bank_of_banks_keeps_tensors(folders: list[Path], tmp_path: Path) -> None:
    """A bank used as the input of another build (every member becomes a member) keeps their tensors."""
    first = tmp_path / "first.apack"
    build_bank(first, folders[:2], rank=4)
    second = tmp_path / "second.apack"
    shutil.copy(first, tmp_path / "copy.apack")
    build_bank(second, [tmp_path / "copy.apack"], rank=3)
    for k in range(2):
        assert_member_tensors(second, f"a{k}", folders[k])
