"""The DeepSpeed configs load, fill every "auto" the way the Trainer does, and validate.

Validation runs in this process: DeepSpeedConfig falls back to world size 1 when no process group
exists, so no launcher or distributed setup is needed.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from deepspeed.runtime.config import DeepSpeedConfig
from transformers import TrainingArguments
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
EXPECTED = {"zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}
# Phi-3.5-vision's text hidden size, from which the Trainer derives the "auto" bucket sizes.
HIDDEN_SIZE = 3072


def _load(name):
    with open(CONFIG_DIR / name, encoding="utf-8") as f:
        return json.load(f)


def _auto_paths(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _auto_paths(value, f"{prefix}{key}.")
    elif node == "auto":
        yield prefix.rstrip(".")


def _fill_like_trainer(config, tmp_path, **training_kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_grad_norm=0.5,
        **training_kwargs,
    )
    hf_config = HfTrainerDeepSpeedConfig(config)
    hf_config.trainer_config_process(args)
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=HIDDEN_SIZE))
    hf_config.trainer_config_finalize(args, model, num_training_steps=100)
    return hf_config.config


def test_every_config_file_is_covered():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize(
    "precision", [{}, {"bf16": True}, {"fp16": True}], ids=["fp32", "bf16", "fp16"]
)
def test_config_validates_after_trainer_fill(name, precision, tmp_path):
    config = _load(name)
    # Batch, accumulation, clipping and precision must come from TrainingArguments.
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto"
    assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
    # The Trainer's torch optimizer and scheduler are used, which also keeps CPU runs working.
    assert "optimizer" not in config and "scheduler" not in config

    filled = _fill_like_trainer(config, tmp_path, **precision)
    assert list(_auto_paths(filled)) == []

    ds = DeepSpeedConfig(filled)
    assert ds.world_size == 1
    assert ds.train_micro_batch_size_per_gpu == 2
    assert ds.gradient_accumulation_steps == 4
    assert ds.train_batch_size == 8
    assert ds.gradient_clipping == 0.5
    assert ds.bfloat16_config.enabled is bool(precision.get("bf16"))
    assert ds.float16_config.enabled is bool(precision.get("fp16"))
    assert ds.zero_config.stage == EXPECTED[name]
    assert ds.zero_config.reduce_bucket_size == HIDDEN_SIZE**2
    assert ds.zero_force_ds_cpu_optimizer is False
    assert ds.zero_allow_untested_optimizer is True


def test_zero2_settings():
    zero = _load("zero2.json")["zero_optimization"]
    assert zero["overlap_comm"] and zero["contiguous_gradients"] and zero["allgather_partitions"]
    assert "offload_optimizer" not in zero and "offload_param" not in zero


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json"])
def test_zero3_saves_full_weights_and_sizes_buckets_from_model(name, tmp_path):
    ds = DeepSpeedConfig(_fill_like_trainer(_load(name), tmp_path))
    assert ds.zero_config.gather_16bit_weights_on_model_save is True
    assert ds.zero_config.prefetch_bucket_size == int(0.9 * HIDDEN_SIZE**2)
    assert ds.zero_config.param_persistence_threshold == 10 * HIDDEN_SIZE


def test_offload_only_in_offload_file(tmp_path):
    plain = DeepSpeedConfig(_fill_like_trainer(_load("zero3.json"), tmp_path))
    assert plain.zero_config.offload_optimizer is None
    assert plain.zero_config.offload_param is None

    offload = DeepSpeedConfig(_fill_like_trainer(_load("zero3_offload.json"), tmp_path))
    assert offload.zero_config.offload_optimizer.device == "cpu"
    assert offload.zero_config.offload_param.device == "cpu"
