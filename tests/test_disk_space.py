"""Disk space: a run the output filesystem cannot hold stops before training; a final save that does not fit
leaves nothing half-written under the final names and says what survived."""

import re

import pytest

from common.training.run_folder import FINAL_WEIGHT_PATTERNS, folder_size

from .recipe_utils import small_filesystem
from .test_reliability import kill_args, one_error_line, run_script, write_jsonl_data

pytestmark = pytest.mark.slow
MIB = 1 << 20


@pytest.fixture
def small_disk(tmp_path):
    """A 100 MiB filesystem: one checkpoint of the tiny model under the default ZeRO-2 (~84 MiB) fits, the final
    save after it (its weights, then their copy in the saved dtype: ~33 MiB) does not."""
    with small_filesystem(tmp_path / "disk", "100m") as disk:
        yield disk


def default_engine_args(tiny_checkpoint, data, out):
    args = [*kill_args(tiny_checkpoint, data, out), "--max_steps", "2", "--save_steps", "2"]
    at = args.index("--deepspeed")
    return args[:at] + args[at + 2:]


def test_a_disk_too_small_is_refused_before_training_and_a_failed_final_save_leaves_no_half_model(tiny_checkpoint, tmp_path,
                                                                                                 small_disk):
    data = write_jsonl_data(tmp_path / "data")
    out = small_disk / "out"
    args = default_engine_args(tiny_checkpoint, data, out)

    refused = run_script("finetune_hf_trainer_ucf101.py", args, tmp_path)
    assert refused.returncode == 1
    error = one_error_line(refused.stderr)
    sizes = re.search(r"has ([\d.]+) MiB free, but this run needs about ([\d.]+) MiB: one checkpoint \(([\d.]+) MiB\) plus "
                      r"the final model \(([\d.]+) MiB\)", error)
    assert sizes, error
    free, needed, checkpoint, final = map(float, sizes.groups())
    assert free < needed and checkpoint < free and "--skip_disk_check" in error
    assert "Running training" not in refused.stderr and not list(out.glob("checkpoint-*"))

    failed = run_script("finetune_hf_trainer_ucf101.py", [*args, "--skip_disk_check"], tmp_path)
    assert failed.returncode == 1
    error = one_error_line(failed.stderr)
    assert f"could not write the final model in {out}: no space left on the device" in error
    assert "nothing was written under its final names" in error
    assert "checkpoint-2 is the newest complete checkpoint and intact" in error and "--resume_from_checkpoint latest" in error
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()
    assert not [p for pattern in FINAL_WEIGHT_PATTERNS for p in out.glob(pattern)], sorted(p.name for p in out.iterdir())
    assert not (out / "final-model.partial").exists()
    # The estimate is what this engine really writes: DeepSpeed's model states and fp32 optimizer shards too.
    assert abs(folder_size(out / "checkpoint-2") / MIB - checkpoint) < 0.05 * checkpoint


def test_a_merge_that_does_not_fit_leaves_the_adapter_and_no_half_merged_model(tiny_checkpoint, tmp_path):
    # 12 MiB: the LoRA run's checkpoints and adapter fit, the merged model (the tiny model's ~17 MB) does not.
    data = write_jsonl_data(tmp_path / "data")
    with small_filesystem(tmp_path / "disk", "12m") as disk:
        out = disk / "out"
        args = [*kill_args(tiny_checkpoint, data, out), "--max_steps", "2", "--save_steps", "2", "--use_lora", "--lora_rank", "4",
                "--merge_lora", "--skip_disk_check"]
        failed = run_script("finetune_hf_trainer_ucf101.py", args, tmp_path)
        assert failed.returncode == 1
        error = one_error_line(failed.stderr)
        assert f"could not write the merged model in {out / 'merged'}: no space left on the device" in error, error
        assert f"the adapter in {out} is whole" in error and "python -m common.export --adapter" in error
        assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
        assert not (out / "merged").exists() and not (out / "merged.partial").exists()
