"""Where each `TrainingArguments` option stands in these recipes: it works, it does not apply, or it is refused.

The recipes' `FinetuneArguments` extends `TrainingArguments`, so every Trainer option parses; each of its fields
belongs to exactly one of three groups, which tests/test_trainer_options.py checks against the installed
transformers (a field that a new version adds fails that test until it is classified here):

- works: a test under tests/ sets it (on a command line the recipes parse, or on TrainingArguments) and checks it;
- `NOT_APPLICABLE`: options with nothing to act on in these recipes, with the reason;
- `REFUSED`: options that would do something other than what they say here, silently; named on a command line
  (whatever the value, `command_line_refusal`) or set in code (`refusal`), they stop the run at parse time with
  the message, which says why and what to use instead.
"""

from __future__ import annotations

import dataclasses

from ..io import json_object
from .compile import compile_refusal

NOT_APPLICABLE: dict[str, str] = {
    **{
        name: "read only by --push_to_hub, which these recipes refuse"
        for name in ("hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision")
    },
    **{
        name: "a setting of the Trackio logger (--report_to trackio), which the Trainer hands on untouched; trackio is not "
        "installed (--report_to trackio is refused without it) and its Space and Bucket need the hub"
        for name in ("project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id")
    },
    "local_rank": "set by the deprecated torch.distributed.launch; torchrun puts LOCAL_RANK in the environment, which is what is read",
    "do_train": "a switch for scripts that the Trainer never reads; these recipes always train",
    "prediction_loss_only": "evaluations during training compute only the loss through the Trainer's loop (their answers "
    "come from generation, common/evaluation/periodic_evaluation.py), so it holds whatever the flag says",
    "eval_accumulation_steps": "moves gathered predictions to the CPU every N steps; the evaluations during training gather "
    "no predictions from the Trainer's loop, only the loss",
}

REFUSED: dict[str, str] = {
    "label_smoothing_factor": (
        "--label_smoothing_factor: the Trainer's label smoother shifts labels only for model classes in transformers' "
        "own causal-LM table, which ours is not, so each position would be trained to predict its own token; drop it"
    ),
    "optim_target_modules": (
        "--optim_target_modules is read by the GaLore and APOLLO optimizers only, whose packages these recipes do not "
        "install and which no test has run on this model; use the default AdamW (--optim)"
    ),
    "liger_kernel_config": (
        "--liger_kernel_config would be ignored: Liger has no entry for phi3_v, so load_model applies its RMSNorm, "
        "SwiGLU and RoPE kernels itself; --use_liger_kernel alone turns them on"
    ),
    "use_cache": (
        "--use_cache: a KV cache in training only costs memory, and with --padding_free it would let the packed "
        "examples attend to each other; generation uses the cache anyway, drop the flag"
    ),
    "auto_find_batch_size": (
        "--auto_find_batch_size would halve the examples per GPU after an out-of-memory error without raising the "
        "gradient accumulation, so the global --batch_size would shrink mid-run; lower --batch_size_per_gpu instead"
    ),
    "bf16_full_eval": (
        "--bf16_full_eval does nothing here: evaluations run inside training, where the Trainer does not cast for "
        "them, and generation runs in the training precision; use --bf16 to train and evaluate in bf16"
    ),
    "fp16_full_eval": (
        "--fp16_full_eval does nothing here: evaluations run inside training, where the Trainer does not cast for "
        "them, and generation runs under the training precision's autocast; drop it"
    ),
    **{
        name: f"--{name} only shapes what the Trainer hands compute_metrics, which these recipes do not use (they score "
        "by generation, and eval_loss needs no predictions); drop it"
        for name in ("include_for_metrics", "batch_eval_metrics", "eval_do_concat_batches", "eval_use_gather_object")
    },
    "save_only_model": (
        "--save_only_model writes checkpoints without optimizer, scheduler and RNG state, yet --resume_from_checkpoint "
        "latest (and the requeue after a stop by signal) would continue from them with a fresh optimizer and "
        "schedule; the final model holds weights only anyway, and --save_total_limit bounds the disk used"
    ),
    "save_on_each_node": (
        "--save_on_each_node: the run record and the checkpoint markers that resume relies on (common/training/run_folder.py) "
        "are written by the main process only, so other nodes' copies could not be resumed in step; put "
        "--output_dir on a filesystem every node shares"
    ),
    "enable_jit_checkpoint": (
        "--enable_jit_checkpoint: these recipes already turn SIGTERM and SIGUSR1 into a checkpoint at the same step on "
        "every rank and exit code 75 (common/training/preemption.py), which the Trainer's per-rank JIT checkpoint would race "
        "with; drop it"
    ),
    "push_to_hub": (
        "--push_to_hub: the Trainer pushes inside save_model, before the recipe writes the final model in the official "
        "format (its dtype, the unused CLIP weights, the config); upload OUTPUT_DIR after the run with `hf upload`"
    ),
    "remove_unused_columns": (
        "--remove_unused_columns true would strip each example's images and messages before the collator sees "
        "them; it must stay false"
    ),
    "label_names": (
        "--label_names other than labels: the collator names the labels 'labels'; other names leave the Trainer's evaluation without "
        "labels, and so without eval_loss; drop it"
    ),
    "length_column_name": (
        "--length_column_name is never read: group_by_length measures each example's exact token length itself "
        "(RecipeDataset.lengths); drop it"
    ),
    "accelerator_config": (
        "--accelerator_config split_batches or dispatch_batches: accelerate would cut each batch by rows, but "
        "pixel_values holds one row per image, not per example; leave both false"
    ),
    "parallelism_config": (
        "--parallelism_config (accelerate's tensor, context and sequence parallelism) is untested with this model "
        "and its image positions; shard with DeepSpeed ZeRO or --fsdp"
    ),
    "do_eval": (
        "--do_eval: the Trainer ignores it; these recipes evaluate before and after training (--skip_eval_before, "
        "--skip_eval_after turn that off) and during it with --eval_strategy"
    ),
    "do_predict": (
        "--do_predict: the Trainer ignores it; predict with `python -m common.predict` on the trained output (the "
        "UCF-101 recipe also scores its test split with --eval_on_test)"
    ),
}


def _default(args, name: str):
    spec = next(f for f in dataclasses.fields(args) if f.name == name)
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def _json_setting(value) -> dict:
    """--accelerator_config as given: a dict, an AcceleratorConfig, inline JSON or a JSON file (what
    TrainingArguments accepts)."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return json_object("--accelerator_config", value)


def _splits_batches(value) -> bool:
    setting = _json_setting(value) if value is not None else {}
    return bool(setting.get("split_batches") or setting.get("dispatch_batches"))


# Refused options that have harmless values, the ones these recipes use: refused only when another value is given.
_REQUESTED_WHEN = {
    "accelerator_config": _splits_batches,
    "label_names": lambda value: value not in (None, ["labels"]),
    "remove_unused_columns": bool,
}


def _requested(args, name: str) -> bool:
    value = getattr(args, name)
    if name in _REQUESTED_WHEN:
        return _REQUESTED_WHEN[name](value)
    # Against the default of the arguments' own class; on a command line `command_line_refusal` has already
    # refused the option whatever its value.
    return value != _default(args, name)


def command_line_refusal(given: set[str]) -> str | None:
    """The message of the first refused option named on the command line (`given`: the fields it sets), whatever
    its value, even its default: none of them does here what its name says. Options with harmless values are left
    to `refusal`, which looks at the value."""
    return next((message for name, message in REFUSED.items() if name in given and name not in _REQUESTED_WHEN), None)


def refusal(args) -> str | None:
    """The first refused Trainer option set in `args` (a FinetuneArguments at parse time), as its one-line
    message; None if there is none."""
    for name, message in REFUSED.items():
        if _requested(args, name):
            return message
    return compile_refusal(args)


__all__ = ["NOT_APPLICABLE", "REFUSED", "command_line_refusal", "refusal"]
