"""A stop and an exact resume in the middle of an epoch, at the defaults users run, under the engine the full and
frozen-vision modes default to (ZeRO-2): NLVR2 fully fine-tuned (two images a row) on 2 processes under
`python -m common.launch` with 2 DataLoader workers a rank. LoRA's engine (DDP) is stopped and resumed the same way
on DocVQA, whose examples draw one answer of several (test_preemption_workers.py); hateful memes and UCF-101 build
their examples as NLVR2 does, without any draw.

SIGTERM to the whole process group (as SLURM and Kubernetes send it, DataLoader workers included) once checkpoint-3
is complete must end the run with exit 75 and a complete checkpoint of the step it stopped at; resuming from it
must reproduce an uninterrupted run's losses, gradient norms, learning rates and final weights bit for bit,
through an epoch boundary.
"""

import os
import signal
from pathlib import Path

import pytest

from .recipe_utils import assert_ok, run_script
from .test_reliability import assert_same_weights, step_losses, stop_by_signal

pytestmark = pytest.mark.slow
SCRIPT = "finetune_hf_trainer_nlvr2.py"
# 12 training rows at a global batch of 2: 6 steps an epoch; 8 steps cross into the second epoch.
MAX_STEPS, SAVE_STEPS, STEPS_PER_EPOCH = 8, 3, 6


def test_sigterm_under_zero2_with_workers_stops_with_a_checkpoint_and_resume_equals_the_uninterrupted_run(tiny_checkpoint, tmp_path):
    from common.fixtures.synthetic import make_nlvr2

    make_nlvr2(n=14, seed=1).save_to_disk(str(tmp_path / "data"))

    def command(out: Path) -> list:
        return ["--model_name_or_path", tiny_checkpoint, "--dataset_path", tmp_path / "data", "--num_eval_rows", "2",
                "--output_dir", out, "--num_crops", "1", "--max_steps", MAX_STEPS, "--save_steps", SAVE_STEPS,
                "--save_total_limit", "3", "--batch_size", "2", "--batch_size_per_gpu", "1", "--dataloader_num_workers", "2",
                "--skip_eval_before", "--skip_eval_after", "--learning_rate", "1e-3", "--warmup_steps", "0", "--seed", "7",
                "--logging_steps", "1", "--resume_from_checkpoint", "latest"]

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert_ok(run_script(SCRIPT, command(straight), tmp_path, nproc=2))

    step, output = stop_by_signal(command(stopped), tmp_path, lambda process: os.killpg(process.pid, signal.SIGTERM),
                                  stopped / f"checkpoint-{SAVE_STEPS}", SCRIPT)
    assert "deepspeed" in output.lower(), "the full mode trains under ZeRO-2 by default"
    checkpoint = stopped / f"checkpoint-{step}"
    assert SAVE_STEPS < step < MAX_STEPS and (checkpoint / "checkpoint_complete.json").is_file()
    assert list(checkpoint.glob("global_step*")), "a DeepSpeed checkpoint"

    result = run_script(SCRIPT, command(stopped), tmp_path, nproc=2)
    assert_ok(result)
    assert f"resuming from {checkpoint}" in result.stderr
    assert step_losses(stopped) == step_losses(straight) and len(step_losses(straight)) == MAX_STEPS
    assert_same_weights(straight, stopped)
