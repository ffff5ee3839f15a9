"""examples/export_peft.py end to end on a tiny model: train, checkpoint, resume, export, load back in PEFT."""

import pathlib
import runpy

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


# PEFT calls a transformers method that transformers has deprecated; nothing here can change that.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_export_peft_example_round_trips(tmp_path):
    pytest.importorskip("peft")
    main = runpy.run_path(str(ROOT / "examples" / "export_peft.py"), run_name="not_main")["main"]
    result = main(["--smoke", "--out", str(tmp_path)])
    assert result["losses"][-1] < result["losses"][0]  # it trained, across the resume
    assert result["peft_max_abs_diff"] < 1e-4 and result["merged_max_abs_diff"] < 1e-4
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (tmp_path / "checkpoints" / "3").is_dir()
