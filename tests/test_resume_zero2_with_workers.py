"""Exact resume in the middle of an epoch, at the defaults users run, under the engine the full and frozen-vision
modes default to (ZeRO-2): NLVR2 fully fine-tuned (two images a row) on 2 processes with 2 DataLoader workers a rank.
LoRA's engine (DDP) is tested the same way on DocVQA, whose examples draw one answer of several
(test_preemption_workers.py); hateful memes and UCF-101 build their examples as NLVR2 does, without any draw.

A run that is stopped writes the same checkpoint as one that goes on, so the interrupted run here is the
uninterrupted one's checkpoint-3 alone in a new folder (with its run.json): resuming from it must reproduce the
uninterrupted run's losses, gradient norms, learning rates and final weights bit for bit, through an epoch boundary.
"""

import shutil
from pathlib import Path

import pytest
import torch

from .recipe_utils import assert_ok, run_script, weights
from .test_reliability import step_losses

pytestmark = pytest.mark.slow
SCRIPT = "finetune_hf_trainer_nlvr2.py"
MAX_STEPS, RESUME_STEP = 8, 3


def test_mid_epoch_resume_with_workers_under_zero2_equals_the_uninterrupted_run(tiny_checkpoint, tmp_path):
    from common.fixtures.synthetic import make_nlvr2

    # 12 training rows (6 steps an epoch), 2 held out for evaluation.
    make_nlvr2(n=14, seed=1).save_to_disk(str(tmp_path / "data"))

    def command(out: Path) -> list:
        return ["--model_name_or_path", tiny_checkpoint, "--dataset_path", tmp_path / "data", "--num_eval_rows", "2",
                "--output_dir", out, "--num_crops", "1", "--max_steps", MAX_STEPS, "--save_steps", RESUME_STEP,
                "--save_total_limit", "3", "--batch_size", "2", "--batch_size_per_gpu", "1", "--dataloader_num_workers", "2",
                "--skip_eval_before", "--skip_eval_after", "--learning_rate", "1e-3", "--warmup_steps", "0", "--seed", "7",
                "--logging_steps", "1", "--resume_from_checkpoint", "latest"]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(run_script(SCRIPT, command(straight), tmp_path, nproc=2))
    resumed.mkdir()
    shutil.copytree(straight / f"checkpoint-{RESUME_STEP}", resumed / f"checkpoint-{RESUME_STEP}")
    shutil.copy2(straight / "run.json", resumed / "run.json")

    result = run_script(SCRIPT, command(resumed), tmp_path, nproc=2)
    assert_ok(result)
    assert f"resuming from {resumed / f'checkpoint-{RESUME_STEP}'}" in result.stderr
    assert "deepspeed" in (result.stdout + result.stderr).lower(), "the full mode trains under ZeRO-2 by default"
    assert step_losses(resumed) == step_losses(straight) and len(step_losses(straight)) == MAX_STEPS
    wanted, actual = weights(straight / "model.safetensors"), weights(resumed / "model.safetensors")
    assert actual.keys() == wanted.keys()
    for name in wanted:
        assert torch.equal(actual[name], wanted[name]), name
