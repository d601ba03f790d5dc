"""Evaluation during training: the parse-time rules and the evaluation split as loss examples.

The end-to-end runs (best checkpoint kept and saved as the final model, --save_strategy best, under torchrun
with 2 processes in LoRA and ZeRO-2 full modes) are in tests/test_recipe_docvqa.py.
"""

import pytest
from PIL import Image

from common.arguments import parse_args
from common.collator import Phi3VCollator
from common.periodic_evaluation import AnswersAsTargets
from common.processing_phi3v import Phi3VProcessor


def parse(tmp_path, *flags, metric="anls"):
    args, = parse_args(argv=["--output_dir", str(tmp_path), "--deepspeed", "none", *flags], metric=metric)
    return args


def test_the_recipes_metric_is_the_default_for_best_model(tmp_path):
    args = parse(tmp_path, "--eval_strategy", "steps", "--eval_steps", "5", "--save_steps", "10", "--load_best_model_at_end")
    assert args.metric_for_best_model == "anls" and args.greater_is_better is True
    args = parse(tmp_path, "--eval_strategy", "steps", "--metric_for_best_model", "eval_loss", "--save_strategy", "best")
    assert args.metric_for_best_model == "eval_loss" and args.greater_is_better is False


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
    processor = Phi3VProcessor.from_pretrained(tiny_checkpoint)
    batch = Phi3VCollator(processor, 1)([loss_set[0]])
    answer = processor.tokenizer("a cat", add_special_tokens=False).input_ids
    labels = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labels[: len(answer)] == answer
