"""Trainer options that work in the recipes as the Trainer defines them (see common/training/trainer_options.py).

One in-process training run sets those whose effect shows in a few steps on the tiny model and checks each
effect; the rest (resume, logging, DDP and DataLoader plumbing, multi-node) must reach the Trainer as given,
which is all the recipes could break: a parse test checks that `FinetuneArguments` hands each on unchanged.
"""

import json

import pytest
import torch
import transformers
from PIL import Image
from transformers import TrainerCallback

from common.data.collator import Phi3VCollator
from common.training.arguments import parse_args
from common.training.model_setup import load_processor
from common.training.recipe import RecipeTrainer, load_model_to_train

EXAMPLES = [
    {"id": f"row-{index}", "images": [Image.new("RGB", (60, 40), (50 * index, 0, 200))] if index % 2 else [],
     "messages": [{"role": "user", "content": "<|image_1|>\nWhat colour?" if index % 2 else "Say a colour."},
                  {"role": "assistant", "content": f"colour {index}"}]}
    for index in range(5)
]


def parse(checkpoint, output_dir, *flags):
    args, = parse_args(argv=["--model_name_or_path", str(checkpoint), "--output_dir", str(output_dir), "--deepspeed", "none",
                             "--num_crops", "1", "--dataloader_num_workers", "0", "--batch_size", "2", "--batch_size_per_gpu", "2",
                             "--save_strategy", "no", "--disable_tqdm", "true", *flags])
    return args


def neftune_hooks(model) -> int:
    hooks = model.get_input_embeddings()._forward_hooks.values()
    return sum(getattr(hook, "__name__", "") == "neftune_post_forward_hook" for hook in hooks)


class Observer(TrainerCallback):
    """What the options should change, seen where the Trainer applies them."""

    def __init__(self):
        self.clipped_norms, self.noise_hooks, self.checkpointing = [], [], None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.noise_hooks.append(neftune_hooks(model))
        self.checkpointing = model.model.layers[0]._gradient_checkpointing_func

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.clipped_norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())


def test_training_options_take_effect(tiny_checkpoint, tmp_path, monkeypatch):
    # --full_determinism and --log_level change process-wide state; put it back for the tests that follow.
    for variable in ("CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC"):
        monkeypatch.delenv(variable, raising=False)
    verbosity = transformers.logging.get_verbosity()
    args = parse(
        tiny_checkpoint, tmp_path,
        "--num_train_epochs", "2", "--dataloader_drop_last", "--data_seed", "7",
        "--learning_rate", "1e-3", "--warmup_steps", "0",
        "--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", json.dumps({"min_lr": 1e-4}),
        "--optim", "adamw_torch", "--adam_beta1", "0.8", "--adam_beta2", "0.9", "--adam_epsilon", "1e-6",
        "--max_grad_norm", "0.01", "--average_tokens_across_devices", "false",
        "--activation_checkpointing_kwargs", json.dumps({"use_reentrant": True}),
        "--neftune_noise_alpha", "5", "--torch_empty_cache_steps", "1",
        "--logging_steps", "3", "--logging_first_step", "--logging_nan_inf_filter", "false",
        "--include_num_input_tokens_seen", "true",
        "--debug", "underflow_overflow", "--full_determinism", "--log_level", "warning",
    )
    observer = Observer()
    processor = load_processor(args.model_name_or_path, args.num_crops)
    collator = Phi3VCollator(processor)
    trainer = RecipeTrainer(model=load_model_to_train(args), args=args, processing_class=processor,
                            data_collator=collator, train_dataset=EXAMPLES, callbacks=[observer])
    try:
        trainer.train()
    finally:
        torch.use_deterministic_algorithms(False)
        transformers.logging.set_verbosity(verbosity)

    # 5 examples in batches of 2 with the last one dropped: 2 steps per epoch, 2 epochs.
    assert trainer.state.global_step == 4 and trainer.state.epoch == 2
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-4)
    group = trainer.optimizer.param_groups[0]
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW" and group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6
    assert len(observer.clipped_norms) == 4 and max(observer.clipped_norms) <= 0.01 * 1.001
    assert observer.checkpointing.keywords["use_reentrant"] is True
    assert observer.noise_hooks == [1] * 4 and neftune_hooks(trainer.model) == 0
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 3]
    # Two epochs of 4 examples (the fifth dropped), padding counted.
    seen = {len(collator.encode(example)) for example in EXAMPLES}
    assert min(seen) * 8 <= trainer.state.num_input_tokens_seen <= max(seen) * 8
    assert torch.are_deterministic_algorithms_enabled() is False


PASSED_ON = [
    (["--logging_strategy", "epoch"], "logging_strategy", "epoch"),
    (["--log_on_each_node", "false"], "log_on_each_node", False),
    (["--log_level_replica", "error"], "log_level_replica", "error"),
    (["--run_name", "flags"], "run_name", "flags"),
    (["--optim_args", "betas=0.8"], "optim_args", "betas=0.8"),
    (["--gradient_checkpointing_kwargs", '{"use_reentrant": true}'], "gradient_checkpointing_kwargs", {"use_reentrant": True}),
    (["--ignore_data_skip"], "ignore_data_skip", True),
    (["--skip_memory_metrics", "false"], "skip_memory_metrics", False),
    (["--restore_callback_states_from_checkpoint"], "restore_callback_states_from_checkpoint", True),
    (["--use_cpu"], "use_cpu", True),
    (["--dataloader_num_workers", "2", "--dataloader_pin_memory", "false"], "dataloader_pin_memory", False),
    (["--dataloader_num_workers", "2", "--dataloader_persistent_workers"], "dataloader_persistent_workers", True),
    (["--dataloader_num_workers", "2", "--dataloader_prefetch_factor", "3"], "dataloader_prefetch_factor", 3),
    (["--dataloader_num_workers", "2", "--dataloader_multiprocessing_context", "spawn"], "dataloader_multiprocessing_context", "spawn"),
    (["--dataloader_in_order", "false"], "dataloader_in_order", False),
    (["--ddp_find_unused_parameters", "true"], "ddp_find_unused_parameters", True),
    (["--ddp_bucket_cap_mb", "50"], "ddp_bucket_cap_mb", 50),
    (["--ddp_broadcast_buffers", "false"], "ddp_broadcast_buffers", False),
    (["--ddp_static_graph", "true"], "ddp_static_graph", True),
    (["--ddp_timeout", "600"], "ddp_timeout", 600),
]


@pytest.mark.parametrize("flags, name, value", PASSED_ON, ids=[name for _, name, _ in PASSED_ON])
def test_plumbing_options_reach_the_trainer_as_given(tmp_path, flags, name, value):
    args, = parse_args(argv=["--output_dir", str(tmp_path), "--use_lora", *flags])
    assert getattr(args, name) == value


@pytest.mark.parametrize(
    "flags, reason",
    [
        # TrainingArguments' own check, in one line: TF32 is an Ampere GPU mode.
        (["--tf32", "true"], "--tf32 requires Ampere or a newer GPU arch"),
        (["--use_liger_kernel"], "--use_liger_kernel needs a CUDA GPU"),
    ],
)
def test_gpu_options_are_refused_on_cpu(tmp_path, capsys, flags, reason):
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv=["--output_dir", str(tmp_path), "--use_lora", *flags])
    assert stopped.value.code == 2
    assert reason in capsys.readouterr().err
