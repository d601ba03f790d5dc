"""Evaluation during training: the parse-time rules and the evaluation split as loss examples.

The end-to-end runs (best checkpoint kept and saved as the final model, --save_strategy best, under torchrun
with 2 processes in LoRA and ZeRO-2 full modes) are in tests/test_recipe_docvqa.py.
"""

import json
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from common.data.collator import Phi3VCollator
from common.model.processing_phi3v import Phi3VProcessor
from common.training.arguments import parse_args
from common.evaluation.periodic_evaluation import AnswersAsTargets
from common.training.preemption import PREEMPTED_EXIT_CODE

from .recipe_utils import DRIVER, REPO_ROOT, offline_env


def parse(tmp_path, *flags, metric="anls"):
    args, = parse_args(argv=["--output_dir", str(tmp_path), "--deepspeed", "none", *flags], metric=metric)
    return args


def test_the_recipes_metric_is_the_default_for_best_model(tmp_path):
    args = parse(tmp_path, "--eval_strategy", "steps", "--eval_steps", "5", "--save_steps", "10", "--load_best_model_at_end")
    assert args.metric_for_best_model == "anls" and args.greater_is_better is True
    args = parse(tmp_path, "--eval_strategy", "steps", "--metric_for_best_model", "eval_loss", "--save_strategy", "best")
    assert args.metric_for_best_model == "eval_loss" and args.greater_is_better is False
    # The Trainer's own evaluation timing and comparison options reach it as given.
    args = parse(tmp_path, "--eval_strategy", "steps", "--eval_delay", "4", "--greater_is_better", "false")
    assert args.eval_delay == 4 and args.greater_is_better is False


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--eval_strategy", "steps", "--metric_for_best_model", "accuracy"], "report anls (by generation) and loss"),
        (["--use_qlora", "--bf16", "--eval_strategy", "epoch"], "corrupt the following training steps"),
        (["--use_qlora", "--bf16", "--eval_on_start"], "corrupt the following training steps"),
    ],
)
def test_impossible_evaluation_flags_are_refused(tmp_path, capsys, flags, reason):
    with pytest.raises(SystemExit) as stopped:
        parse(tmp_path, *flags)
    assert stopped.value.code == 2
    assert reason in capsys.readouterr().err


def test_evaluation_examples_become_loss_examples_answered_with_their_first_reference(tiny_checkpoint):
    image = Image.new("RGB", (64, 48), (10, 20, 30))
    question = {"role": "user", "content": "<|image_1|>\nWhat is it?"}
    eval_set = [{"id": "q7", "images": [image], "messages": [question], "references": ["a cat", "cat"]}]
    loss_set = AnswersAsTargets(eval_set)
    assert len(loss_set) == 1
    assert loss_set[0] == {"id": "q7", "images": [image], "messages": [question, {"role": "assistant", "content": "a cat"}]}
    processor = Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=1)
    batch = Phi3VCollator(processor)([loss_set[0]])
    answer = processor.tokenizer("a cat", add_special_tokens=False).input_ids
    labels = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labels[: len(answer)] == answer


@pytest.mark.slow
def test_a_stop_by_signal_keeps_its_checkpoint_and_the_best_one_under_save_total_limit_1(tiny_checkpoint, tmp_path):
    # Left alone, the Trainer's end of training would load the best checkpoint and, for --save_total_limit 1,
    # delete every other one: the checkpoint just written to resume from included.
    from common.fixtures.synthetic import make_docvqa

    data, out = tmp_path / "docvqa", tmp_path / "out"
    make_docvqa(n=8, seed=0).save_to_disk(str(data))
    command = [sys.executable, str(DRIVER), "finetune_hf_trainer_docvqa.py", "--model_name_or_path", str(tiny_checkpoint),
               "--dataset_path", str(data), "--output_dir", str(out), "--num_crops", "1", "--max_steps", "8",
               "--batch_size", "1", "--deepspeed", "none", "--skip_eval_before", "--skip_eval_after", "--max_eval_samples", "2",
               "--max_new_tokens", "2", "--dataloader_num_workers", "0", "--eval_strategy", "steps", "--eval_steps", "1",
               "--save_steps", "1", "--save_total_limit", "1", "--load_best_model_at_end", "--warmup_steps", "0"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=offline_env(tmp_path, PHI3V_TEST_SLOW_STEPS="0.5"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoint-2" / "checkpoint_complete.json").is_file():
            assert process.poll() is None and time.time() < deadline, "the run ended before step 2"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=240)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == PREEMPTED_EXIT_CODE, output[-4000:]
    step = int(output.strip().splitlines()[-1].split("after step ")[1].split(":")[0])
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    best = state["best_model_checkpoint"]
    # The untrained model's ANLS stays 0: the first evaluation's checkpoint is the best.
    assert best.endswith("checkpoint-1") and (out / "checkpoint-1" / "checkpoint_complete.json").is_file()
    assert (out / f"checkpoint-{step}" / "checkpoint_complete.json").is_file()
    assert not (out / "model.safetensors").exists()
