"""`python -m eval` on a LoRA run's `final/` (an adapter folder, no config.json): the base comes from the adapter
config or `--base`, and the numbers are those of the merged model evaluated as a full folder."""

import json
import shutil

import pytest
import torch

from eval.run import EvalConfig, evaluate_model, main
from trainer.config import load_config
from trainer.model_loading import load_vlm
from trainer.train import train


@pytest.fixture(scope="module")
def lora_run(world_base):
    root = world_base
    final = train(load_config(None, ["--data_root", str(root), "--run_name", "lora-eval", "--max_steps", "2",
                                     "--batch_size", "4", "--warmup_steps", "1", "--lr", "1e-2", "--lora", "true"]),
                  progress=False)
    return root, final


def test_a_lora_final_folder_evaluates_on_its_recorded_base(lora_run, tmp_path):
    from peft import PeftModel

    root, final = lora_run
    base_dir, world = root / "models" / "base", root / "world" / "tiny-seed0"
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").exists()
    args = ["--world", str(world), "--limit", "3", "--device", "cpu", "--no-progress", "--max-new-tokens", "24"]
    result = main(["--model", str(final), "--out", str(tmp_path / "lora.json"), *args])
    assert result["base"] == str(base_dir) and result["pope"] and result["chair"]["levels"]["object"]["n_captions"] == 3
    # The same numbers as the merged model saved as a full folder, and the adapter does move the weights.
    base, processor = load_vlm(base_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, final).merge_and_unload()
    moved = [k for k, v in merged.state_dict().items() if k in before and not torch.equal(before[k], v)]
    assert moved, "the LoRA adapter left every weight as in the base model"
    # The projector trains outside the adapters (freeze_projector: false): its trained values must be in final/.
    assert any("multi_modal_projector" in k for k in moved), "the trained projector did not reach the adapter folder"
    merged.save_pretrained(tmp_path / "merged")
    processor.save_pretrained(tmp_path / "merged")
    cfg = EvalConfig(limit=3, device="cpu", progress=False, max_new_tokens=24)
    full = evaluate_model(tmp_path / "merged", world, config=cfg)
    assert full["base"] is None and full["pope"] == result["pope"] and full["chair"] == result["chair"]
    explicit = main(["--model", str(final), "--base", str(base_dir), "--out", str(tmp_path / "b.json"), *args])
    assert explicit["pope"] == result["pope"]


def test_an_adapter_whose_base_is_not_local_names_the_base_knob(lora_run, tmp_path):
    root, final = lora_run
    moved = tmp_path / "final"
    shutil.copytree(final, moved)
    cfg_file = moved / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                    "base_model_name_or_path": "llava-hf/llava-1.5-7b-hf"}))
    world = root / "world" / "tiny-seed0"
    cfg = EvalConfig(limit=1, device="cpu", progress=False)
    with pytest.raises(FileNotFoundError, match="--base"):
        evaluate_model(moved, world, config=cfg)
    with pytest.raises(ValueError, match="only for LoRA adapter folders"):
        evaluate_model(root / "models" / "base", world, config=cfg, base=root / "models" / "base")
