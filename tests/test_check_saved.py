"""``check`` compares a PEFT folder's modules_to_save with the tensors it holds (issue 16 item 2)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adapterpack.cli import main


class _Tiny(torch.nn.Module):
    """``model.q_proj`` and ``model.norm``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.q_proj = torch.nn.Linear(8, 8)
        self.model.norm = torch.nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(self.model.q_proj(x))


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[_Tiny, Path, Path]:
    """A PEFT folder with modules_to_save=["norm"] as PEFT saves it, and a copy without the norm tensors
    (what a bank extraction that drops modules_to_save leaves)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _Tiny()
    cfg = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["norm"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path / "full")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "adapter_config.json").write_text((tmp_path / "full" / "adapter_config.json").read_text())
    st = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    assert "base_model.model.model.norm.weight" in st
    save_file({k: v for k, v in st.items() if ".norm." not in k}, str(tmp_path / "bare" / "adapter_model.safetensors"))
    return base, tmp_path / "full", tmp_path / "bare"


def test_check_peft_catches_modules_to_save_without_tensors(folders: tuple[_Tiny, Path, Path]) -> None:
    from peft import PeftModel

    base, full, bare = folders
    with pytest.raises(KeyError, match=r"norm\.weight"):  # what PEFT does with the bare folder
        PeftModel.from_pretrained(copy.deepcopy(base), bare)
    runner = CliRunner()
    ok = runner.invoke(main, ["check", "--target", "peft", str(full)])
    assert ok.exit_code == 0 and "loads it as is" in ok.output, ok.output
    bad = runner.invoke(main, ["check", "--target", "peft", str(bare)])
    assert bad.exit_code == 1 and "modules_to_save lists ['norm']" in bad.output and "KeyError" in bad.output, bad.output
    js = json.loads(runner.invoke(main, ["check", "--target", "peft", "--json", str(bare)]).output)
    assert [(f["severity"], [m["name"] for m in f["modules"]]) for f in js["findings"]] == [("refuse", ["norm"])]


def test_check_vllm_refuses_modules_to_save_and_the_export_leaves_it_out(folders: tuple[_Tiny, Path, Path], tmp_path: Path) -> None:
    _, _, bare = folders
    runner = CliRunner()
    bad = runner.invoke(main, ["check", "--target", "vllm", str(bare)])
    assert bad.exit_code == 1 and "modules_to_save ['norm']" in bad.output, bad.output
    out = tmp_path / "for-vllm"
    r = runner.invoke(main, ["convert", str(bare), str(out), "--target", "vllm"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "adapter_config.json").read_text()).get("modules_to_save") is None
    again = runner.invoke(main, ["check", "--target", "vllm", str(out)])
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("value", [9223372036854775808, {"norm": 1}, ["norm", 3], True])
def test_a_modules_to_save_of_the_wrong_type_is_refused_on_read(folders: tuple[_Tiny, Path, Path], value: object) -> None:
    """modules_to_save that is not a string, a list of strings or null is an InputError naming it when the folder is
    read (check --target vllm, which lists it, ended in a TypeError on an integer; found by tools/fuzz_import --cli)."""
    import adapterpack
    from adapterpack.errors import InputError

    _, full, _ = folders
    cfg = json.loads((full / "adapter_config.json").read_text())
    cfg["modules_to_save"] = value
    (full / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="modules_to_save must be a string, a list of strings or null"):
        adapterpack.open(full)
    result = CliRunner().invoke(main, ["check", "--target", "vllm", str(full)])
    assert result.exit_code == 1 and not isinstance(result.exception, TypeError), result.output
    assert "modules_to_save must be" in result.output
