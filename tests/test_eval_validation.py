"""The evaluation split goes through the validation pass before training, with --skip_bad_examples applied."""

import json
import os

import pytest

from .recipe_utils import assert_ok, run_script
from .test_reliability import run_main, write_jsonl_data

pytestmark = pytest.mark.slow


def test_a_bad_validation_image_stops_before_training_or_is_skipped_and_reported(tiny_checkpoint, tmp_path, capsys):
    data = write_jsonl_data(tmp_path / "data")
    truncated = data / "images" / "val" / "v1.0.jpg"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    args = ["--model_name_or_path", tiny_checkpoint, "--data_dir", data, "--num_crops", "1", "--deepspeed", "none",
            "--max_new_tokens", "2", "--dataloader_num_workers", "0"]
    code, stderr = run_main("finetune_hf_trainer_ucf101", [*args, "--output_dir", tmp_path / "strict"], capsys)
    error = [line for line in stderr.splitlines() if "error:" in line]
    assert code == 1 and len(error) == 1 and "ucf101 val row 1 (id 'val-0000000001')" in error[0]
    assert "Loading weights" not in stderr, "the evaluation split is checked before the model loads"

    out = tmp_path / "skipping"
    result = run_script("finetune_hf_trainer_ucf101.py", [*args, "--output_dir", out, "--skip_bad_examples", "--max_steps", "1",
                                                          "--batch_size", "1"], tmp_path)
    assert_ok(result)
    for name in ("before", "after"):
        payload = json.loads((out / f"eval_{name}.json").read_text())
        assert payload["num_examples"] == len(payload["examples"]) == 1 and payload["num_skipped"] == 1
        assert payload["skipped"][0]["id"] == "val-0000000001" and "Truncated" in payload["skipped"][0]["reason"]
    assert "1 unusable examples skipped, not counted" in result.stderr
    mask = os.umask(0)
    os.umask(mask)
    for written in (out / "eval_after.json", out / "model.safetensors", out / "checkpoint-1" / "model.safetensors"):
        assert written.stat().st_mode & 0o777 == 0o666 & ~mask, f"{written} must get the umask's mode"
