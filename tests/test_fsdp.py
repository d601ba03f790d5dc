"""--fsdp: refused on CPU and in impossible combinations, turned into the Trainer's FSDP2 settings on a GPU (faked
at parse time), and our model sharded, stepped, evaluated and saved under torch's FSDP2 on gloo.

accelerate runs FSDP on accelerators only, so the Trainer path itself runs in tests/test_gpu.py; here one
torchrun launch drives `common.training.fsdp.shard_model`, which applies accelerate's wrapping rules, directly.
"""

import json
import subprocess
import sys

import pytest

import common.training.arguments
from common.training.arguments import parse_args
from common.training.fsdp import WRAPPED_LAYERS

from .recipe_utils import REPO_ROOT, assert_ok, offline_env, parse_refusal

DRIVER = REPO_ROOT / "tests" / "drivers" / "fsdp_step.py"


@pytest.fixture
def gpu(monkeypatch):
    """Parse as on a CUDA GPU with bf16, in a process no launcher started (so no process group starts)."""
    monkeypatch.setattr(common.training.arguments, "cuda_available", lambda: True)
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda *args, **kwargs: True)
    # TrainingArguments sets it from fsdp_config; restored after the test.
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")


def parse(tmp_path, *flags):
    args, = parse_args(argv=["--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "out"), *flags])
    return args


def refusal(tmp_path, capsys, *flags) -> str:
    return parse_refusal(capsys, parse, tmp_path, *flags)


@pytest.mark.parametrize("flags", [["--fsdp"], ["--fsdp", "full_shard auto_wrap", "--deepspeed", "none"]])
def test_fsdp_on_cpu_is_refused_with_its_reason(tmp_path, capsys, flags):
    reason = refusal(tmp_path, capsys, *flags)
    assert "--fsdp needs CUDA GPUs: on CPU accelerate ignores it and would train plain DDP instead" in reason
    assert "ds_configs/zero3.json" in reason


def test_fsdp_replaces_the_default_zero2_with_fsdp2_settings(gpu, tmp_path):
    args = parse(tmp_path, "--fsdp", "--bf16")
    assert args.deepspeed is None and args.fsdp is True, "no DeepSpeed"
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_cls_names_to_wrap": ",".join(WRAPPED_LAYERS),
        "cpu_ram_efficient_loading": False,
        "state_dict_type": "FULL_STATE_DICT",
        "activation_checkpointing": True,
        "reshard_after_forward": True,
    }
    # FSDP's checkpointing instead of transformers' (the Trainer refuses both at once).
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False


@pytest.mark.parametrize(
    "flags, weights, compute, scaling",
    [
        (["--bf16"], "float32 (trainable, upcast by accelerate for FSDP)", "bfloat16 (FSDP mixed precision)", "none"),
        ([], "float32 (trainable, upcast by accelerate for FSDP)", "float16 (FSDP mixed precision)", "dynamic"),
        (["--bf16", "--freeze_vision_model"], "float32 (trainable, upcast by accelerate for FSDP), frozen vision tower bfloat16",
         "bfloat16 (FSDP mixed precision)", "none"),
    ],
)
def test_the_precision_line_says_what_fsdp_trains_in(gpu, tmp_path, flags, weights, compute, scaling):

    precision = parse(tmp_path, "--fsdp", *flags).precision()
    assert (precision.weights, precision.compute, precision.loss_scaling) == (weights, compute, scaling)


@pytest.mark.parametrize(
    "flags, settings",
    [
        (["--fsdp", "shard_grad_op"], {"reshard_after_forward": False}),
        (["--fsdp", "full_shard offload"], {"reshard_after_forward": True, "cpu_offload": True}),
        (["--fsdp", "--activation_checkpointing", "false"], {"activation_checkpointing": False}),
        (["--fsdp", "--gradient_checkpointing", "false"], {"activation_checkpointing": False}),
        (["--fsdp", "--fsdp_config", '{"fsdp_reshard_after_forward": false}'], {"reshard_after_forward": False}),
        (["--fsdp", "shard_grad_op", "--fsdp_config", '{"reshard_after_forward": true}'], {"reshard_after_forward": True}),
    ],
)
def test_fsdp_words_and_config(gpu, tmp_path, flags, settings):
    plugin = parse(tmp_path, *flags).fsdp_plugin_args
    assert {key: plugin.get(key) for key in settings} == settings


def test_fsdp_config_file(gpu, tmp_path):
    config = tmp_path / "fsdp.json"
    config.write_text(json.dumps({"activation_checkpointing": False, "cpu_ram_efficient_loading": True}))
    plugin = parse(tmp_path, "--fsdp", "--fsdp_config", str(config)).fsdp_plugin_args
    assert plugin["activation_checkpointing"] is False and plugin["cpu_ram_efficient_loading"] is True
    assert plugin["transformer_cls_names_to_wrap"] == ",".join(WRAPPED_LAYERS)


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--fsdp", "--deepspeed", "ds_configs/zero3.json"], "--fsdp and --deepspeed exclude each other"),
        (["--fsdp", "--use_lora"], "--fsdp shards full and frozen-vision training only"),
        (["--fsdp", "--use_qlora"], "--fsdp shards full and frozen-vision training only"),
        (["--fsdp", "hybrid_shard"], "--fsdp hybrid_shard: these recipes run FSDP2, which takes full_shard"),
        (["--fsdp", "--fsdp_config", '{"version": 1}'], "FSDP1 is deprecated"),
        (["--fsdp", "--fsdp_config", '{"state_dict_type": "SHARDED_STATE_DICT"}'], "the Trainer then writes no model.safetensors"),
        (["--fsdp", "--fsdp_config", "missing.json"], "--fsdp_config missing.json: not readable JSON"),
        (["--fsdp_config", '{"version": 2}'], "--fsdp_config does nothing without --fsdp"),
    ],
)
def test_impossible_fsdp_combinations_are_refused(gpu, tmp_path, capsys, flags, reason):
    assert reason in refusal(tmp_path, capsys, *flags)


def test_model_sharded_stepped_evaluated_and_saved_under_fsdp2_on_gloo(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(DRIVER), str(tiny_checkpoint), str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert_ok(result)
    report = json.loads((out / "report.json").read_text())
    # 2 decoder + 2 CLIP layers, the embedding, the final norm and lm_head; each rank holds half the weights.
    assert report["wrapped_layers"] == 4 and report["units"] == 7
    assert report["local_fraction"] < 0.51
    # The sharded step is the DDP step: the same averaged gradients and the same AdamW update.
    assert report["largest_update"] > 5e-4
    assert report["max_gradient_difference"] < 1e-6 and report["max_weight_difference"] < 1e-6
    assert len(report["predictions"]) == 3
