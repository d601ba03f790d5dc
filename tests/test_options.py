"""Option names and parse-time refusals: Hugging Face's names beside the recipe's, refused options detected on the
command line, the Trainer-option holes that used to pass the parse, and the grouped --help."""

import importlib.util
import json

import pytest

import common.training.arguments
from common.training.arguments import parse_args
from common.training.trainer_options import REFUSED

from .recipe_utils import parse_refusal


def parse(tmp_path, *flags):
    args, = parse_args(argv=["--model_name_or_path", "does-not-exist", "--output_dir", str(tmp_path), "--deepspeed", "none", *flags])
    return args


def refusal(tmp_path, capsys, *flags) -> str:
    return parse_refusal(capsys, parse, tmp_path, *flags)


@pytest.fixture
def two_ranks(monkeypatch):
    # The world size torchrun --nproc_per_node=2 gives each rank, without the process group a real one would start.
    monkeypatch.setattr(common.training.arguments, "world_size_from_env", lambda: 2)


@pytest.mark.parametrize(
    "flags, expected",
    [
        # (per GPU, accumulation, global batch, eval batch, weight decay)
        ([], (1, 32, 64, 8, 0.01)),
        (["--per_device_train_batch_size", "2", "--batch_size", "8"], (2, 2, 8, 8, 0.01)),
        (["--batch_size_per_gpu", "2", "--batch_size", "8"], (2, 2, 8, 8, 0.01)),
        (["--per_device_train_batch_size", "2", "--batch_size_per_gpu", "2", "--batch_size", "8"], (2, 2, 8, 8, 0.01)),
        # Without --batch_size, Hugging Face's accumulation sets the global batch: 2 ranks x 2 x 3.
        (["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3"], (2, 3, 12, 8, 0.01)),
        (["--gradient_accumulation_steps", "4", "--batch_size", "8"], (1, 4, 8, 8, 0.01)),
        (["--per_device_eval_batch_size", "3"], (1, 32, 64, 3, 0.01)),
        (["--eval_batch_size", "3"], (1, 32, 64, 3, 0.01)),
        # Its default value too: on main this was taken as "not given" and trained with --wd's 0.01.
        (["--weight_decay", "0.0"], (1, 32, 64, 8, 0.0)),
        (["--wd", "0.1"], (1, 32, 64, 8, 0.1)),
    ],
)
def test_hugging_face_names_and_the_recipes_set_the_same_fields(tmp_path, two_ranks, flags, expected):
    args = parse(tmp_path, *flags)
    assert (args.batch_size_per_gpu, args.eval_batch_size, args.wd) == (expected[0], expected[3], expected[4])
    assert (
        args.per_device_train_batch_size, args.gradient_accumulation_steps, args.batch_size,
        args.per_device_eval_batch_size, args.weight_decay,
    ) == expected


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--per_device_train_batch_size", "2", "--batch_size_per_gpu", "4"],
         "--batch_size_per_gpu 4 and --per_device_train_batch_size 2 are two names of one setting"),
        (["--per_device_eval_batch_size", "2", "--eval_batch_size", "4"],
         "--eval_batch_size 4 and --per_device_eval_batch_size 2 are two names of one setting"),
        (["--weight_decay", "0.0", "--wd", "0.1"], "--wd 0.1 and --weight_decay 0.0 are two names of one setting"),
        (["--gradient_accumulation_steps", "4", "--batch_size", "64"],
         "--batch_size 64 contradicts --gradient_accumulation_steps 4, which with 2 GPU(s) x 1 examples per GPU gives a global batch of 8"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be positive"),
    ],
)
def test_two_names_with_different_values_are_refused(tmp_path, capsys, two_ranks, flags, reason):
    assert reason in refusal(tmp_path, capsys, *flags)


# Flags built from the name: tests/test_trainer_options.py counts a quoted flag as a test that the option works.
@pytest.mark.parametrize("name, default", [("label_smoothing_factor", "0.0"), ("use_cache", "false"), ("do_eval", "false")])
def test_a_refused_option_is_refused_at_its_default_value_too(tmp_path, capsys, name, default):
    assert refusal(tmp_path, capsys, f"--{name}", default).endswith(f"error: {REFUSED[name]}")


def test_a_logger_list_naming_a_missing_logger_is_refused(tmp_path, capsys):
    assert importlib.util.find_spec("wandb") is None
    assert refusal(tmp_path, capsys, "--report_to", "tensorboard,wandb").endswith(
        "error: --report_to wandb needs the wandb package: pip install wandb"
    )


def test_save_strategy_best_needs_evaluations(tmp_path, capsys):
    reason = refusal(tmp_path, capsys, "--use_lora", "--save_strategy", "best")
    assert "--save_strategy best writes a checkpoint only at an evaluation that improves the metric" in reason
    assert "add --eval_strategy steps --eval_steps N" in reason
    args = parse(tmp_path, "--use_lora", "--save_strategy", "best", "--eval_strategy", "steps", "--eval_steps", "2")
    assert args.save_strategy == "best"


@pytest.fixture
def gpu_without_flash_attn(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(common.training.arguments, "cuda_available", lambda: True)
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda *args, **kwargs: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "flash_attn" else find_spec(name, *rest))


def test_flash_attention_without_a_gpu_is_refused_with_what_to_do(tmp_path, capsys):
    # Every launch command in the README has --bf16 --use_flash_attention.
    reason = refusal(tmp_path, capsys, "--bf16", "--use_flash_attention")
    assert reason.endswith(
        "error: --use_flash_attention needs a CUDA GPU (flash-attn has no CPU kernels) and none is visible; drop the "
        "flag to run here with the default sdpa attention"
    )
    assert "--attn_implementation flash_attention_2 needs a CUDA GPU" in refusal(
        tmp_path, capsys, "--bf16", "--attn_implementation", "flash_attention_2"
    )


def test_flash_attention_without_the_package_is_refused_with_what_to_do(tmp_path, capsys, gpu_without_flash_attn):
    reason = refusal(tmp_path, capsys, "--bf16", "--use_flash_attention")
    assert "--use_flash_attention needs the flash-attn package, which is not installed: pip install -r requirements-gpu.txt" in reason
    assert "or drop the flag" in reason


@pytest.mark.parametrize(
    "flags, hint",
    [
        (["--warmup_ratio", "0.1"], "use --warmup_steps 0.1 (below 1, --warmup_steps is a fraction of all steps)"),
        (["--warmup_ratio=0.05"], "use --warmup_steps 0.05"),
        (["--evaluation_strategy", "epoch"], "use --eval_strategy epoch"),
        (["--per_gpu_train_batch_size", "2"], "use --per_device_train_batch_size 2"),
    ],
)
def test_removed_trainer_options_name_their_equivalent(tmp_path, capsys, flags, hint):
    reason = refusal(tmp_path, capsys, *flags)
    assert f"error: {flags[0].partition('=')[0]} is not an option of transformers 5 or these recipes: {hint}" in reason


def test_max_new_tokens_must_fit_in_the_context_after_the_longest_prompt(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "phi3_v", "max_position_embeddings": 4096}))

    def flags(*more):
        return ["--model_name_or_path", str(model), "--output_dir", str(tmp_path / "out"), "--deepspeed", "none", *more]

    def refused(*more):
        return parse_refusal(capsys, lambda: parse_args(argv=flags(*more)))

    assert refused("--max_length", "4000", "--max_new_tokens", "97").endswith(
        f"error: --max_new_tokens 97 does not fit in the context of {model} (max_position_embeddings 4096) after a "
        "prompt of up to --max_length tokens: 4096 - --max_length 4000 = 96; lower --max_new_tokens, or --max_length "
        "to leave more room"
    )
    assert parse_args(argv=flags("--max_length", "4000", "--max_new_tokens", "96"))[0].max_new_tokens == 96
    # The default --max_length 8192 leaves nothing in a 4096-position context.
    assert "4096 - --max_length 8192 = -4096" in refused()
    assert "at most 4095 with no --max_length" in refused("--max_length", "0", "--max_new_tokens", "4096")
    assert parse_args(argv=flags("--max_length", "0", "--max_new_tokens", "4095"))[0].max_new_tokens == 4095


def test_help_lists_the_recipe_options_first_and_refused_ones_without_defaults(capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv=["--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    recipe, trainer = text.index("\nrecipe options:\n"), text.index("\nTrainer options (transformers.TrainingArguments")
    listed = [text.index(f"\n  --{name} ") for name in ("batch_size_per_gpu", "max_new_tokens", "per_device_train_batch_size", "learning_rate")]
    assert recipe < listed[0] < listed[1] < trainer < listed[2] < listed[3]
    body, epilog = text[: text.index("Refused Trainer options")], text[text.index("Refused Trainer options") :]
    for name in REFUSED:
        assert f"--{name} " not in body and f"--{name}," not in body, name
        assert f"--{name}" in epilog.replace("\n", " "), name
    start = body.index("\n  --gradient_accumulation_steps ")
    accumulation = body[start : body.index("\n  --", start + 1)]
    assert "(default: 1)" not in accumulation and "without --batch_size it sets the global batch" in " ".join(accumulation.split())
