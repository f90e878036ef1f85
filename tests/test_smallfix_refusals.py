"""Refusals that were missing: ``verify`` of a missing file gave an OSError's type, not the adapterpack error the other
commands give; ``rerank``, ``compress`` and ``bank build/add`` took unconverted PiSSA-style adapters (their ΔW is not
s·B·A against the saved base), which merge, the exporters and ``torch.apply`` refuse."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import adapterpack  # noqa: E402
from adapterpack.bank.ops import add_to_bank, build_bank  # noqa: E402
from adapterpack.cli import main  # noqa: E402
from adapterpack.errors import ConversionError  # noqa: E402
from adapterpack.formats.source import BASE_INITS  # noqa: E402
from adapterpack.ops.compress import compress, compress_file  # noqa: E402
from adapterpack.ops.rerank import RerankPolicy, rerank, rerank_file  # noqa: E402

# --- verify of a missing file -----------------------------------------------------------------------------------------


def _json(*args: str | Path) -> tuple[int, dict]:
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, json.loads(r.stdout)


def test_verify_json_of_a_missing_file_gives_inspects_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.apack"
    code, got = _json("verify", "--json", missing)
    icode, want = _json("inspect", "--json", missing)
    assert (code, icode) == (1, 1)
    error = {"type": "UnrecognizedInputError", "message": f"{missing}: no such file or folder"}
    assert got == want == {"ok": False, "error": error}
    r = CliRunner().invoke(main, ["verify", str(missing)], catch_exceptions=False)
    assert r.exit_code == 1 and "no such file or folder" in r.stderr and "Traceback" not in r.output


# --- unconverted PiSSA-style adapters ---------------------------------------------------------------------------------


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=40, tie_word_embeddings=False)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _save(folder: Path, init: bool | str, seed: int) -> Path:
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_llama(), cfg)
    torch.manual_seed(seed)
    with torch.no_grad():  # "training": the factors move away from their init
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two plain PEFT LoRAs and a real unconverted PiSSA one (PEFT built its factors from W's SVD)."""
    d = tmp_path_factory.mktemp("pissa")
    inits: dict[str, bool | str] = {"plain0": False, "plain1": False, "pissa": "pissa"}
    out = {name: _save(d / name, init, seed + 1) for seed, (name, init) in enumerate(inits.items())}
    assert json.loads((out["pissa"] / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    return out


def _with_init(folders: dict[str, Path], tmp: Path, init: str) -> Path:
    """plain0 with its config naming ``init`` (CorDA, OLoRA, LoftQ and LoRA-GA save the same way as PiSSA)."""
    dst = tmp / f"as-{init}"
    shutil.copytree(folders["plain0"], dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": init}))
    return dst


def test_rerank_and_compress_refuse_unconverted_pissa(folders: dict[str, Path], tmp_path: Path) -> None:
    src = folders["pissa"]
    with adapterpack.open(src) as ad:
        with pytest.raises(ConversionError, match=r"init_lora_weights='pissa'.*re-ranking"):
            rerank(ad, RerankPolicy(rank=1))
        with pytest.raises(ConversionError, match=r"init_lora_weights='pissa'.*compressing"):
            compress(ad, budget=100_000)
    for dst in ("r.apack", "r-peft"):
        with pytest.raises(ConversionError, match="pissa"):
            rerank_file(src, tmp_path / dst, RerankPolicy(rank=1))
        assert not (tmp_path / dst).exists()
    with pytest.raises(ConversionError, match="pissa"):
        compress_file(src, tmp_path / "c.apack", budget=100_000)
    assert not (tmp_path / "c.apack").exists()
    # the CLI says it as the error it is
    r = CliRunner().invoke(main, ["rerank", "--json", "--rank", "1", str(src), str(tmp_path / "cli.apack")], catch_exceptions=False)
    assert r.exit_code == 1 and json.loads(r.stdout)["error"]["type"] == "ConversionError"
    # a plain LoRA is not refused
    with adapterpack.open(folders["plain0"]) as ad:
        rerank(ad, RerankPolicy(rank=1))
        compress(ad, budget=100_000)


@pytest.mark.parametrize("init", [i for i in BASE_INITS if i != "pissa"] + ["pissa_niter_4"])
def test_every_base_rewriting_init_is_refused(folders: dict[str, Path], tmp_path: Path, init: str) -> None:
    with adapterpack.open(_with_init(folders, tmp_path, init)) as ad:
        with pytest.raises(ConversionError, match="init_lora_weights"):
            rerank(ad, RerankPolicy(rank=1))
        with pytest.raises(ConversionError, match="init_lora_weights"):
            compress(ad, budget=100_000)


def test_bank_build_and_add_refuse_unconverted_pissa(folders: dict[str, Path], tmp_path: Path) -> None:
    bank = tmp_path / "b.apack"
    with pytest.raises(ConversionError, match=r"adapter 'pissa' was initialised with init_lora_weights='pissa'.*bank"):
        build_bank(bank, [folders["plain0"], folders["pissa"]], rank=2)
    assert not bank.exists()
    build_bank(bank, [folders["plain0"], folders["plain1"]], rank=2)
    before = bank.read_bytes()
    with pytest.raises(ConversionError, match="pissa"):
        add_to_bank(bank, [folders["pissa"]])
    assert bank.read_bytes() == before
    with pytest.raises(ConversionError, match="loftq"):  # the adapter's config decides, not its folder's name
        add_to_bank(bank, [_with_init(folders, tmp_path, "loftq")], names=["fine"])
    assert bank.read_bytes() == before
    r = CliRunner().invoke(main, ["bank", "add", "--json", str(bank), str(folders["pissa"])], catch_exceptions=False)
    assert r.exit_code == 1 and json.loads(r.stdout)["error"]["type"] == "ConversionError"
    assert bank.read_bytes() == before


def test_an_in_memory_adapter_with_a_pissa_config_is_refused(folders: dict[str, Path]) -> None:
    """The refusal reads the recorded config, so an adapter built in Python (or re-read from an .apack) is refused too."""
    with adapterpack.open(folders["plain0"]) as ad:
        src = copy.deepcopy(ad.source)
        src["config"]["init_lora_weights"] = "corda"
        mem = ad.derived({n: ad.module(n) for n in ad.modules})
        mem.source = src
        with pytest.raises(ConversionError, match="corda"):
            rerank(mem, RerankPolicy(energy=0.9))
        with pytest.raises(ConversionError, match="corda"):
            compress(mem, budget=100_000)
