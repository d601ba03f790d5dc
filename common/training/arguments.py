"""Command-line arguments shared by every recipe.

`FinetuneArguments` extends the HF `TrainingArguments`, so every Trainer option works as usual, and adds the
reference recipe's flags with their meaning kept (`--batch_size` is the global batch, `--wd`, `--no-tqdm`,
`--use_lora`, ...). Impossible combinations fail in `__post_init__`, that is at parse time, before anything
is loaded. Dataset scripts add their own dataclass next to this one.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import SaveStrategy

from ..dtypes import dtype_name
from ..evaluation.generation import GenerationSettings
from ..model.image_processing_phi3v import MAX_NUM_CROPS
from ..model.modeling_phi3v import ATTENTION_CHOICES
from .build_lock import check_build_locks
from .deepspeed_config import NO_DEEPSPEED, deepspeed_config
from .fsdp import configure_fsdp, fsdp_refusal
from .trainer_options import REFUSED, command_line_refusal
from .trainer_options import refusal as trainer_option_refusal

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEEPSPEED_CONFIG = REPO_ROOT / "ds_configs" / "zero2.json"
# The reference recipe's defaults of the flags that have a Hugging Face synonym (`resolve_synonyms`).
DEFAULT_BATCH_SIZE = 64
DEFAULT_EVAL_BATCH_SIZE = 8
DEFAULT_WEIGHT_DECAY = 0.01
SAVE_DTYPE_CHOICES = ("base", "float32", "bfloat16", "float16")
# The samplers RecipeTrainer builds for a RecipeDataset (common/training/recipe.py: `RecipeTrainer.train_sampler`).
TRAIN_SAMPLING_STRATEGIES = ("random", "sequential", "group_by_length")
# pip names of the --report_to integrations whose package name differs from the integration's.
LOGGER_PACKAGES = {"comet_ml": "comet-ml", "azure_ml": "azureml-core", "flyte": "flytekit"}


@dataclass(frozen=True)
class Precision:
    """How a run holds, computes and updates its weights."""

    weights: str
    compute: str
    master_weights: str
    loss_scaling: str

    def __str__(self) -> str:
        return (
            f"precision: weights {self.weights}; compute {self.compute}; master weights {self.master_weights}; "
            f"loss scaling {self.loss_scaling}"
        )


class ArgumentError(ValueError):
    """An impossible flag combination; raised at parse time with a one-line reason."""


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def evaluates_during_training(args) -> bool:
    """Whether --eval_strategy or --eval_on_start asks for evaluations during training (the strategy is still a
    str before TrainingArguments converts it)."""
    return str(args.eval_strategy) not in ("no", "IntervalStrategy.NO") or bool(args.eval_on_start)


def cuda_available() -> bool:
    # The one device check behind the precision and CPU rules, so that tests can parse as if on a GPU.
    return torch.cuda.is_available()


@dataclass
class FinetuneArguments(TrainingArguments):
    # Model and processor
    model_name_or_path: str = field(
        default="microsoft/Phi-3.5-vision-instruct",
        metadata={"help": "Hub id or local folder of a Phi-3.5-vision checkpoint (e.g. one from `python -m common.tiny`)."},
    )
    use_flash_attention: bool = field(
        default=False, metadata={"help": "Use flash-attn 2 kernels (needs the flash-attn package, a GPU and --bf16)."}
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "Attention kernels when --use_flash_attention is not given.", "choices": ATTENTION_CHOICES},
    )
    num_crops: int = field(
        default=16, metadata={"help": f"Maximum number of 336x336 tiles per image (1..{MAX_NUM_CROPS})."}
    )
    # Precision: one of three flags, or the default chosen in `choose_precision`
    bf16: bool = field(
        default=False,
        metadata={
            "help": "Train in bf16: bf16 weights and compute, no loss scaling (LoRA adapters, and DeepSpeed's master "
            "copies, stay fp32). On GPUs with bf16 (A100, H100, ...) and on CPU."
        },
    )
    fp16: bool = field(
        default=False,
        metadata={
            "help": "fp16 mixed precision: fp32 weights, fp16 compute under autocast, dynamic loss scaling (under "
            "DeepSpeed: its fp16 mode, fp16 weights with fp32 master copies). The default on a CUDA GPU, as in the "
            "reference recipe; refused on CPU, which has no fp16 autocast or loss scaler."
        },
    )
    fp32: bool = field(
        default=False,
        metadata={"help": "Train in plain fp32 (no autocast, no loss scaling) instead of the GPU default of fp16 mixed precision; the default on CPU."},
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={"help": "Allow loading a checkpoint that has only pickle (.bin) weights; pickle can run code."},
    )
    # Training mode: one switch each, resolved into `training_mode`
    freeze_vision_model: bool = field(
        default=False, metadata={"help": "Freeze the CLIP tower, separators and projection; train the decoder."}
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on a frozen base model."})
    use_qlora: bool = field(default=False, metadata={"help": "LoRA on a 4-bit (nf4) base model; implies --use_lora."})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha_ratio: float = field(default=2.0, metadata={"help": "LoRA alpha = rank x this ratio."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    merge_lora: bool = field(
        default=False, metadata={"help": "After LoRA training, also write the merged full model to OUTPUT_DIR/merged."}
    )
    save_dtype: str = field(
        default="base",
        metadata={
            "help": "dtype of the final model's weights (and of OUTPUT_DIR/merged): the base checkpoint's (bf16 for the "
            "official one), or float32, bfloat16, float16. Checkpoints for resume keep full precision.",
            "choices": SAVE_DTYPE_CHOICES,
        },
    )
    # The reference recipe's batch and optimiser flags. Each has a Hugging Face synonym (below, among the Trainer
    # options); both default to None so that `resolve_synonyms` can tell a flag given from one left out.
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": f"Global batch size (all GPUs, all accumulation steps). Default: {DEFAULT_BATCH_SIZE}, or GPUs x "
            "examples per GPU x --gradient_accumulation_steps when that is given."
        },
    )
    batch_size_per_gpu: int | None = field(
        default=None,
        metadata={
            "help": "Examples per GPU per step (Hugging Face's name: --per_device_train_batch_size). Default: 1 for "
            "full and frozen-vision training (a 4.2B model with ~2.4k-token examples fills a 40 GB card), 4 for "
            "LoRA/QLoRA (frozen weights leave room for activations)."
        },
    )
    wd: float | None = field(
        default=None, metadata={"help": f"Weight decay (Hugging Face's name: --weight_decay). Default: {DEFAULT_WEIGHT_DECAY}."}
    )
    no_tqdm: bool = field(default=False, metadata={"help": "Disable progress bars.", "aliases": ["--no-tqdm"]})
    # Evaluation by generation, before and after training
    eval_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Examples per GPU per generation batch and eval_loss batch (Hugging Face's name: "
            f"--per_device_eval_batch_size). Default: {DEFAULT_EVAL_BATCH_SIZE}."
        },
    )
    max_new_tokens: int = field(
        default=64,
        metadata={
            "help": "Longest generated answer in evaluation; at most the model's max_position_embeddings minus "
            "--max_length (the longest prompt the run allows)."
        },
    )
    skip_eval_before: bool = field(default=False, metadata={"help": "Do not evaluate before training."})
    skip_eval_after: bool = field(default=False, metadata={"help": "Do not evaluate after training."})
    # Data policy
    max_length: int = field(
        default=8192,
        metadata={
            "help": "Longest training example in tokens; longer ones stop the run at the validation pass (or are skipped "
            "with --skip_bad_examples), never truncated. 0: no limit. The default holds every recipe's data at its "
            "num_crops (a DocVQA page at 16 crops <= 2.7k tokens, two NLVR2 images <= 5.4k, 8 video frames at 4 crops "
            "<= 6.3k) and keeps full fine-tuning at 1 example per 80 GB GPU in memory: the reference used 36-42 GB "
            "at ~2.4k tokens and activation memory grows with length, so ~3x that fits, while one 121k-token row "
            "would run out of memory mid-run."
        },
    )
    skip_bad_examples: bool = field(
        default=False, metadata={"help": "Log, count and skip unusable examples instead of stopping the run."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an --output_dir that holds another run's checkpoints or model: they are moved "
            "into OUTPUT_DIR/previous-run-ID/ first (nothing is deleted)."
        },
    )
    skip_disk_check: bool = field(
        default=False,
        metadata={"help": "Train even if the output filesystem has less free space than one checkpoint plus the final model take."},
    )
    padding_free: bool = field(
        default=False, metadata={"help": "Pack each per-GPU batch into one row without padding (no padding compute)."}
    )
    # Hugging Face's names of the recipe's batch and weight-decay flags: synonyms, resolved in `resolve_synonyms`.
    per_device_train_batch_size: int | None = field(
        default=None, metadata={"help": "Examples per GPU per step: the same setting as --batch_size_per_gpu."}
    )
    per_device_eval_batch_size: int | None = field(
        default=None, metadata={"help": "Examples per GPU per evaluation batch: the same setting as --eval_batch_size."}
    )
    weight_decay: float | None = field(default=None, metadata={"help": "Weight decay: the same setting as --wd."})
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={
            "help": "Steps accumulated per optimizer step. Default: --batch_size / (GPUs x examples per GPU); "
            "without --batch_size it sets the global batch instead."
        },
    )
    # TrainingArguments defaults changed to the reference recipe's, plus periodic checkpoints it lacked
    output_dir: str | None = field(default="./output/", metadata={"help": "Where checkpoints, the model and evaluations go."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Training epochs."})
    learning_rate: float = field(default=4e-5, metadata={"help": "Peak learning rate."})
    vision_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate of the CLIP vision tower (its LoRA adapters under --use_lora); default: "
            "--learning_rate. Peers report that a lower rate than the decoder's trains better."
        },
    )
    projection_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate of the image projection and separators (their LoRA adapters under --use_lora); default: --learning_rate."},
    )
    warmup_steps: float = field(default=50, metadata={"help": "Linear warm-up steps (or a fraction of all steps if < 1)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "Adam beta2."})
    adam_epsilon: float = field(default=1e-7, metadata={"help": "Adam epsilon."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_strategy: SaveStrategy | str = field(default="steps", metadata={"help": "When to write checkpoints: steps, epoch or no."})
    save_steps: float = field(default=200, metadata={"help": "Write a checkpoint every N optimiser steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Loggers, comma-separated: none, tensorboard, wandb, ..."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator needs the raw examples."}
    )
    dataloader_num_workers: int = field(default=4, metadata={"help": "Processes decoding images for training."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Every used parameter gets a gradient; no unused-parameter search."}
    )
    # Not a command-line flag: what --torch_compile, --torch_compile_backend and --torch_compile_mode asked for.
    compile_layers: dict | None = field(default=None, init=False)
    # Not a command-line flag: what --use_liger_kernel asked for (applied where the model is loaded).
    liger_kernels: bool = field(default=False, init=False)

    def __post_init__(self):
        if not cuda_available():
            # Without this, torchrun on CPU trains unsynchronised ranks with no error (see docs/cpu notes).
            self.use_cpu = True
        self.choose_precision()
        self.check_combinations()
        self.use_lora = self.use_lora or self.use_qlora
        if self.use_flash_attention:
            self.attn_implementation = "flash_attention_2"
        self.resolve_synonyms()
        if self.no_tqdm:
            self.disable_tqdm = True
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            # The reference trains with checkpointing on: ~2.4k-token examples need it on most GPUs.
            self.activation_checkpointing = True
        if self.activation_checkpointing_kwargs is None and self.gradient_checkpointing_kwargs is None:
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
        if self.padding_free and self.attn_implementation != "flash_attention_2":
            # Measured in bench/: sdpa attends over the whole packed row with a block-diagonal mask, which costs
            # more than the padding it removes; flash attention's variable-length kernel does not.
            logger.warning("--padding_free without flash attention is correct but slower than padded batches")
        self.deepspeed = deepspeed_for(self.deepspeed, self.training_mode, self.fsdp)
        if self.fsdp:
            configure_fsdp(self)
        if self.deepspeed and "RANK" not in os.environ:
            # DeepSpeed would look for MPI and fail with an ImportError that names neither cause.
            raise ArgumentError(
                "DeepSpeed without a launcher needs the environment that set_launcher_environment() writes: call it "
                "before parse_args, as the scripts' main() does, or start the run with torchrun"
            )
        if self.deepspeed:
            check_build_locks()
        super().__post_init__()
        if self.torch_compile:
            # Compiled layer by layer where the model is built (common/training/compile.py), not by the Trainer, whose
            # whole-model compile breaks the graph at every data-dependent step between the layers.
            self.compile_layers = {"backend": self.torch_compile_backend, "mode": self.torch_compile_mode}
            self.torch_compile, self.torch_compile_backend, self.torch_compile_mode = False, None, None
        if self.use_liger_kernel:
            # Applied to the decoder where the model is loaded (training.apply_liger_kernels): the Trainer's own
            # Liger hook looks the model type up in Liger's table, where "phi3_v" is missing.
            self.liger_kernels, self.use_liger_kernel = True, False

    def resolve_synonyms(self) -> None:
        """The recipe's batch and weight-decay flags and Hugging Face's names for them set the same fields: either
        name works, both with different values are refused, and the global batch follows from
        --gradient_accumulation_steps when only that is given."""
        self.batch_size_per_gpu = self.per_device_train_batch_size = same_setting(
            ("--batch_size_per_gpu", self.batch_size_per_gpu),
            ("--per_device_train_batch_size", self.per_device_train_batch_size),
            4 if self.use_lora else 1,
        )
        self.eval_batch_size = self.per_device_eval_batch_size = same_setting(
            ("--eval_batch_size", self.eval_batch_size),
            ("--per_device_eval_batch_size", self.per_device_eval_batch_size),
            DEFAULT_EVAL_BATCH_SIZE,
        )
        self.wd = self.weight_decay = same_setting(("--wd", self.wd), ("--weight_decay", self.weight_decay), DEFAULT_WEIGHT_DECAY)
        world = world_size_from_env()
        per_step = world * self.batch_size_per_gpu
        if self.gradient_accumulation_steps is not None:
            implied = per_step * self.gradient_accumulation_steps
            if self.batch_size is not None and self.batch_size != implied:
                raise ArgumentError(
                    f"--batch_size {self.batch_size} contradicts --gradient_accumulation_steps "
                    f"{self.gradient_accumulation_steps}, which with {world} GPU(s) x {self.batch_size_per_gpu} examples "
                    f"per GPU gives a global batch of {implied}; give one of the two"
                )
            self.batch_size = implied
        elif self.batch_size is None:
            self.batch_size = DEFAULT_BATCH_SIZE
        if self.batch_size % per_step:
            raise ArgumentError(
                f"--batch_size {self.batch_size} is not divisible by world size {world} x --batch_size_per_gpu "
                f"{self.batch_size_per_gpu} = {per_step}; choose a global batch that is a multiple of {per_step}"
            )
        self.gradient_accumulation_steps = self.batch_size // per_step

    def choose_precision(self) -> None:
        """--bf16, --fp16 or --fp32; without any, the reference recipe's `fp16 = not args.bf16` on a CUDA GPU (fp16
        mixed precision, which the Trainer gets as fp16=True on a model loaded in fp32) and fp32 on CPU."""
        if self.bf16 + self.fp16 + self.fp32 > 1:
            raise ArgumentError("--bf16, --fp16 and --fp32 exclude each other; give one (--bf16 on A100/H100, --fp16 on V100)")
        if self.use_cpu:
            if self.fp16:
                # What fp16 would do on CPU depends on the mode: fp32 under DDP, pure fp16 without a loss scaler
                # under LoRA, DeepSpeed's fp16 under ZeRO; none of them is fp16 mixed precision.
                raise ArgumentError(
                    "--fp16 needs a CUDA GPU: on CPU there is no fp16 autocast or loss scaler; use --bf16, or no precision flag for fp32"
                )
        elif not (self.bf16 or self.fp32):
            self.fp16 = True

    def check_combinations(self) -> None:
        if (self.use_flash_attention or self.attn_implementation == "flash_attention_2") and not self.bf16:
            # Nothing is lost: every GPU flash-attn 2 supports (Ampere or newer) has bf16, this model's own dtype.
            flag = "--use_flash_attention" if self.use_flash_attention else "--attn_implementation flash_attention_2"
            raise ArgumentError(f"{flag} needs --bf16 (flash-attn 2 runs on bf16-capable GPUs only, and fp16 mixed precision keeps fp32 weights)")
        if self.use_flash_attention and self.attn_implementation not in ("sdpa", "flash_attention_2"):
            raise ArgumentError(f"--use_flash_attention contradicts --attn_implementation {self.attn_implementation}; give one of them")
        self.check_flash_attention()
        if str(self.save_strategy) in ("best", "SaveStrategy.BEST") and str(self.eval_strategy) in ("no", "IntervalStrategy.NO"):
            # The Trainer saves under "best" only after an evaluation that improves the metric: with none, never.
            raise ArgumentError(
                "--save_strategy best writes a checkpoint only at an evaluation that improves the metric, and this run "
                "evaluates only before and after training; add --eval_strategy steps --eval_steps N (or epoch), or "
                "use --save_strategy steps"
            )
        if self.use_qlora:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ArgumentError("--use_qlora needs the bitsandbytes package: pip install bitsandbytes")
            if self.fp32:
                raise ArgumentError("--use_qlora contradicts --fp32: the 4-bit base computes in bf16 or fp16 (fp16 mixed precision is the GPU default)")
            if not (self.bf16 or self.fp16):
                raise ArgumentError("--use_qlora on CPU needs --bf16: the 4-bit base computes in bf16 or fp16, and fp16 needs a CUDA GPU")
            if self.use_cpu and evaluates_during_training(self):
                # bitsandbytes repacks 4-bit weights for inference after a no-grad forward on CPU, and the LoRA
                # gradients of every later step come out silently wrong (a UserWarning only).
                raise ArgumentError(
                    "--use_qlora with --eval_strategy on CPU: an evaluation would make bitsandbytes repack the 4-bit "
                    "weights and corrupt the following training steps; on CPU evaluate after training (the default), or use --use_lora"
                )
        if not 1 <= self.num_crops <= MAX_NUM_CROPS:
            raise ArgumentError(f"--num_crops must be between 1 and {MAX_NUM_CROPS}, got {self.num_crops}")
        if self.merge_lora and not (self.use_lora or self.use_qlora):
            raise ArgumentError("--merge_lora only applies to --use_lora or --use_qlora training")
        for flag in ("batch_size", "batch_size_per_gpu", "per_device_train_batch_size", "eval_batch_size",
                     "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                raise ArgumentError(f"--{flag} must be positive, got {getattr(self, flag)}")
        if self.lora_rank < 1:
            raise ArgumentError(f"--lora_rank must be positive, got {self.lora_rank}")
        if self.max_length < 0:
            raise ArgumentError(f"--max_length must be 0 (no limit) or a number of tokens, got {self.max_length}")
        if 0 < self.max_length < 16:
            raise ArgumentError(f"--max_length {self.max_length} is too short for any image example; 0 turns the limit off")
        if self.use_liger_kernel:
            if not cuda_available():
                raise ArgumentError("--use_liger_kernel needs a CUDA GPU (Liger's kernels are Triton kernels)")
            if importlib.util.find_spec("liger_kernel") is None:
                raise ArgumentError("--use_liger_kernel needs the liger-kernel package: pip install -r requirements-gpu.txt")
        if self.padding_free and self.attn_implementation == "eager" and not self.use_flash_attention:
            raise ArgumentError("--padding_free needs sdpa or flash attention (eager attention ignores the packing)")
        if self.train_sampling_strategy not in TRAIN_SAMPLING_STRATEGIES:
            raise ArgumentError(
                f"--train_sampling_strategy {self.train_sampling_strategy} is not supported: the recipes' trainer builds "
                f"{', '.join(TRAIN_SAMPLING_STRATEGIES)} samplers only (batch_rebalance measures each example by its "
                "input_ids, which ours get only in the collator); use group_by_length to batch by length"
            )
        for flag, rate in (("--vision_learning_rate", self.vision_learning_rate), ("--projection_learning_rate", self.projection_learning_rate)):
            if rate is None:
                continue
            if rate <= 0:
                raise ArgumentError(f"{flag} must be positive, got {rate}")
            if self.freeze_vision_model:
                raise ArgumentError(
                    f"{flag} has nothing to train: --freeze_vision_model freezes the CLIP tower, separators and projection; drop one of the two"
                )
            deepspeed = deepspeed_config(self.deepspeed)
            own = sorted({"optimizer", "scheduler"} & set(deepspeed))
            if own:
                # DeepSpeed would build them itself, with one rate for every parameter.
                raise ArgumentError(
                    f"{flag} needs the Trainer's optimizer and scheduler, but the DeepSpeed config {self.deepspeed} has "
                    f"its own ({' and '.join(own)} section); remove that section, as in ds_configs/"
                )
        self.check_generation_budget()
        self.check_loggers()
        self.check_unsupported()
        if reason := trainer_option_refusal(self):
            raise ArgumentError(reason)

    def check_flash_attention(self) -> None:
        """flash-attn 2 kernels need the package and a CUDA GPU; without either the model load would fail on every
        rank after the validation pass."""
        if not (self.use_flash_attention or self.attn_implementation == "flash_attention_2"):
            return
        flag = "--use_flash_attention" if self.use_flash_attention else "--attn_implementation flash_attention_2"
        if not cuda_available():
            raise ArgumentError(
                f"{flag} needs a CUDA GPU (flash-attn has no CPU kernels) and none is visible; drop the flag to run here "
                "with the default sdpa attention"
            )
        if importlib.util.find_spec("flash_attn") is None:
            raise ArgumentError(
                f"{flag} needs the flash-attn package, which is not installed: pip install -r requirements-gpu.txt "
                "--no-build-isolation, or drop the flag (the default sdpa attention uses PyTorch's flash kernels on "
                "recent GPUs)"
            )

    def check_generation_budget(self) -> None:
        """Evaluation generates up to --max_new_tokens after a prompt, inside the model's context: a prompt may be as
        long as --max_length (the longest example the run accepts), so at most max_position_embeddings minus that
        are left for the answer. Checked when the checkpoint's config.json is on disk (a local folder, or the hub
        cache): nothing is downloaded at parse time."""
        if self.max_new_tokens < 1:
            raise ArgumentError(f"--max_new_tokens must be positive, got {self.max_new_tokens}")
        context = model_context(self.model_name_or_path)
        if context is None:
            return
        prompt = self.max_length or 1
        if self.max_new_tokens > context - prompt:
            if self.max_length:
                room = (f"{context} - --max_length {self.max_length} = {context - prompt}; lower --max_new_tokens, "
                        "or --max_length to leave more room")
            else:
                room = f"at most {context - 1} with no --max_length; lower --max_new_tokens"
            raise ArgumentError(
                f"--max_new_tokens {self.max_new_tokens} does not fit in the context of {self.model_name_or_path} "
                f"(max_position_embeddings {context}) after a prompt of up to --max_length tokens: {room}"
            )

    def check_unsupported(self) -> None:
        """Trainer options these recipes cannot honour yet fail now, not after the model has loaded or, worse,
        while something else trains in their place."""
        reason = fsdp_refusal(self)
        if reason:
            raise ArgumentError(reason)

    def check_loggers(self) -> None:
        """A logger whose package is missing fails now, not after the model has loaded."""
        from transformers.integrations.integration_utils import (
            INTEGRATION_TO_CALLBACK,
            get_available_reporting_integrations,
        )

        # A comma-separated list is one string to TrainingArguments, which would hand "tensorboard,wandb" on as
        # one unknown integration that fails only when the Trainer is built: split it here.
        given = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        requested = [name.strip() for item in given for name in item.split(",") if name.strip()]
        if requested != given:
            self.report_to = requested
        if not set(requested) - {"none", "all"}:
            return
        available = set(get_available_reporting_integrations())
        for name in requested:
            if name in INTEGRATION_TO_CALLBACK and name not in available:
                package = LOGGER_PACKAGES.get(name, name)
                raise ArgumentError(f"--report_to {name} needs the {package} package: pip install {package}")

    @property
    def training_mode(self) -> str:
        return training_mode_of(self.use_lora, self.use_qlora, self.freeze_vision_model)

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.bf16:
            return torch.bfloat16
        if self.fp16:
            return torch.float16
        return torch.float32

    @property
    def model_dtype(self) -> torch.dtype:
        """bf16 weights under --bf16, as the reference recipe loads them; fp32 otherwise, in every mode.

        Under fp16 mixed precision the fp32 weights are the master weights, and a frozen LoRA/QLoRA base stays fp32
        too, as in the reference: autocast then runs the matmuls in fp16 while the residual stream and the norms
        stay fp32. An fp16 base would make those fp16 too, whose range is far narrower than bf16's, the dtype this
        model was trained in.
        """
        return torch.bfloat16 if self.bf16 else torch.float32

    def model_loading(self) -> dict:
        """`model_setup.load_model`'s settings for this run's base model."""
        return {
            "dtype": self.model_dtype,
            "attn_implementation": self.attn_implementation,
            "device": self.device,
            "qlora_compute_dtype": self.compute_dtype if self.training_mode == "qlora" else None,
            "allow_pickle_weights": self.allow_pickle_weights,
            "liger_kernels": self.liger_kernels,
        }

    def generation_settings(self) -> GenerationSettings:
        """How this run's evaluations generate (`common.evaluation.periodic_evaluation.run_evaluation`)."""
        return GenerationSettings(
            output_dir=Path(self.output_dir),
            batch_size=self.eval_batch_size,
            max_new_tokens=self.max_new_tokens,
            num_workers=self.dataloader_num_workers,
            fp16_autocast=bool(self.fp16) and self.device.type == "cuda",
        )

    def training_mode_settings(self) -> dict:
        """`model_setup.setup_training_mode`'s settings for this run."""
        return {
            "mode": self.training_mode,
            "lora_rank": self.lora_rank,
            "lora_alpha_ratio": self.lora_alpha_ratio,
            "lora_dropout": self.lora_dropout,
            "lora_vision": not self.freeze_vision_model,
            "seed": self.seed,
            "compile_layers": self.compile_layers,
        }

    def precision(self) -> Precision:
        """What training will run in: read from the arguments, since DeepSpeed recasts the model only when it
        starts."""
        if self.deepspeed:
            # DeepSpeed casts the whole model to its config's dtype ("auto" follows --bf16/--fp16) and keeps fp32
            # master copies in its optimizer, whatever dtype the model loaded in.
            config = self.hf_deepspeed_config
            dtype = config.dtype()
            if dtype == torch.float32:
                return Precision("float32", "float32", "none", "none")
            scaling = "none"
            if dtype == torch.float16:
                scale = config.get_value("fp16.loss_scale", 0)
                scaling = "dynamic" if scale == 0 else f"static ({scale})"
            return Precision(f"{dtype_name(dtype)} (DeepSpeed)", dtype_name(dtype), "float32 (DeepSpeed)", scaling)
        mixed = self.compute_dtype != torch.float32
        if self.fsdp and mixed:
            # accelerate upcasts the trainable weights of an FSDP2 model to fp32 and has FSDP compute in 16 bits; the
            # frozen tower of frozen-vision training keeps the dtype it loaded in. (FSDP is refused with LoRA.)
            frozen = f", frozen vision tower {dtype_name(self.model_dtype)}" if self.training_mode == "frozen_vision" else ""
            return Precision(
                weights=f"float32 (trainable, upcast by accelerate for FSDP){frozen}",
                compute=f"{dtype_name(self.compute_dtype)} (FSDP mixed precision)",
                master_weights="float32 (the weights themselves)",
                loss_scaling="dynamic" if self.fp16 else "none",
            )
        lora = self.training_mode in ("lora", "qlora")
        weights = dtype_name(self.model_dtype)
        if self.training_mode == "qlora":
            weights = f"nf4 4-bit linear layers, {weights} elsewhere"
        if lora:
            # peft creates the adapters in fp32 on a 16-bit base (get_peft_model's autocast_adapter_dtype).
            weights += ", LoRA adapters float32"
        return Precision(
            weights=weights,
            compute=f"{dtype_name(self.compute_dtype)} (autocast)" if mixed else "float32",
            master_weights="float32" if mixed and (lora or self.model_dtype == torch.float32) else "none",
            # The Trainer adds a dynamic GradScaler to fp16 mixed precision; bf16 has fp32's range and needs none.
            loss_scaling="dynamic" if self.fp16 else "none",
        )


def model_context(model_name_or_path: str) -> int | None:
    """max_position_embeddings of a checkpoint whose config.json is on disk (a folder, or the hub cache); None
    when it is not, or does not say."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    config = Path(model_name_or_path) / "config.json"
    if not config.is_file():
        try:
            cached = try_to_load_from_cache(model_name_or_path, "config.json")
        except HFValidationError:
            # Neither a folder nor a hub id: the model load reports that.
            return None
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        # A damaged config.json is the model load's to report, with its own message.
        return None
    return value if isinstance(value, int) else None


def same_setting(recipe: tuple[str, object], hugging_face: tuple[str, object], default):
    """The value of a setting that has two names, each (flag, value or None when not given)."""
    (recipe_flag, recipe_value), (hf_flag, hf_value) = recipe, hugging_face
    if recipe_value is not None and hf_value is not None and recipe_value != hf_value:
        raise ArgumentError(
            f"{recipe_flag} {recipe_value} and {hf_flag} {hf_value} are two names of one setting with different "
            "values; give one of them"
        )
    return next((value for value in (recipe_value, hf_value) if value is not None), default)


# What torchrun sets in each process it starts; DeepSpeed looks for MPI without them.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def training_mode_of(use_lora: bool, use_qlora: bool, freeze_vision_model: bool) -> str:
    """The one training mode the three switches select."""
    if use_qlora:
        return "qlora"
    if use_lora:
        return "lora"
    return "frozen_vision" if freeze_vision_model else "full"


def deepspeed_for(deepspeed: str | None, training_mode: str, fsdp) -> str | None:
    """The DeepSpeed config a run trains with: none when --deepspeed says none or FSDP shards instead; ZeRO-2
    (ds_configs/zero2.json) by default for full and frozen-vision training."""
    if deepspeed in NO_DEEPSPEED:
        return None
    if deepspeed is None and training_mode in ("full", "frozen_vision") and not fsdp:
        return str(DEFAULT_DEEPSPEED_CONFIG)
    return deepspeed


class _QuietParser(HfArgumentParser):
    """A parser whose every error is an exception, printed nowhere: `parse_args` reports it."""

    def error(self, message):
        raise argparse.ArgumentError(None, message)


def set_launcher_environment(argv: list[str] | None = None) -> None:
    """A run started with plain `python`, not torchrun, that will train under DeepSpeed (the full modes' default)
    or FSDP: the variables a launcher sets, for one process, which TrainingArguments needs when `parse_args`
    builds it (DeepSpeed otherwise looks for MPI). Each script's main() calls it before parsing; a launched
    process (RANK set) and runs without either engine are left as they are. A command line that does not parse
    changes nothing here: `parse_args` reports it."""
    if "RANK" in os.environ:
        return
    # The script's own options are unknown here: no abbreviation may take one of them (--metric) for ours.
    reader = _QuietParser(FinetuneArguments, add_help=False, allow_abbrev=False)
    try:
        options = reader.parse_known_args(sys.argv[1:] if argv is None else list(argv))[0]
    except argparse.ArgumentError:
        return
    mode = training_mode_of(options.use_lora, options.use_qlora, options.freeze_vision_model)
    if not (deepspeed_for(options.deepspeed, mode, options.fsdp) or options.fsdp):
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(dict(zip(LAUNCHER_VARIABLES, ("0", "0", "1", "127.0.0.1", str(port)))))


def check_best_metric(argv: list[str] | None, metric: str) -> None:
    """--metric_for_best_model must name what the recipe's evaluations report: its metric or the loss. Read from
    the command line before the full parse, which under DeepSpeed already starts a process group."""
    reader = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    reader.add_argument("--metric_for_best_model")
    chosen = reader.parse_known_args(argv)[0].metric_for_best_model
    if chosen is not None and chosen.removeprefix("eval_") not in (metric, "loss"):
        raise ArgumentError(
            f"--metric_for_best_model {chosen}: this recipe's evaluations report {metric} (by generation) and loss; "
            "choose one of them"
        )


# Options that transformers 5 removed and that have an equivalent here: an unknown option that names one gets it.
RENAMED_OPTIONS = {
    "--warmup_ratio": "--warmup_steps {value} (below 1, --warmup_steps is a fraction of all steps)",
    "--evaluation_strategy": "--eval_strategy {value}",
    "--per_gpu_train_batch_size": "--per_device_train_batch_size {value}",
    "--per_gpu_eval_batch_size": "--per_device_eval_batch_size {value}",
    "--no_cuda": "--use_cpu",
}
# Marks the fields a command line does not set, in `given_fields`.
_NOT_GIVEN = object()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except None: the recipe's own options say in words what their default depends on."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(*dataclass_types) -> HfArgumentParser:
    """The parser of `FinetuneArguments` plus a script's dataclasses, with a --help that lists the recipe's own
    options first, then the Trainer options that work here; the refused ones are named at the end, without a
    default, since each stops the run."""
    parser = HfArgumentParser((FinetuneArguments, *dataclass_types), formatter_class=HelpFormatter)
    trainer_fields = {spec.name for spec in dataclasses.fields(TrainingArguments)}
    recipe = parser.add_argument_group("recipe options")
    trainer = parser.add_argument_group(
        "Trainer options (transformers.TrainingArguments; the recipe's defaults where they differ)"
    )
    for action in list(parser._optionals._group_actions):
        if action.dest in REFUSED:
            action.help = argparse.SUPPRESS
        parser._optionals._group_actions.remove(action)
        (trainer if action.dest in trainer_fields else recipe)._group_actions.append(action)
    parser._action_groups = [recipe, trainer, *(g for g in parser._action_groups if g not in (recipe, trainer))]
    parser.usage = "%(prog)s [recipe options] [Trainer options]"
    parser.epilog = (
        "Refused Trainer options (each stops the run at start with its reason and what to use instead): "
        + ", ".join(f"--{name}" for name in REFUSED)
        + ". --remove_unused_columns false, --label_names labels and an --accelerator_config without split_batches "
        "or dispatch_batches, what the recipes use, pass."
    )
    return parser


def given_fields(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[set[str], list[str]]:
    """The fields the command line sets (whatever their values, a default included) and what the parser does
    not know. Parsed into a namespace that already holds a marker for every field, which argparse keeps where
    no flag overwrites it."""
    namespace = argparse.Namespace(**{a.dest: _NOT_GIVEN for a in parser._actions if a.dest != argparse.SUPPRESS})
    parsed, unknown = parser.parse_known_args(argv, namespace=namespace)
    return {name for name, value in vars(parsed).items() if value is not _NOT_GIVEN}, unknown


def renamed_option_hint(unknown: list[str], argv: list[str]) -> str | None:
    """For the first unknown option that transformers 5 removed in favour of another form: what to give instead."""
    for token in unknown:
        name, _, value = token.partition("=")
        if name not in RENAMED_OPTIONS:
            continue
        if not value and token in argv:
            following = argv[argv.index(token) + 1 : argv.index(token) + 2]
            value = following[0] if following and not following[0].startswith("--") else "VALUE"
        return f"{name} is not an option of transformers 5 or these recipes: use {RENAMED_OPTIONS[name].format(value=value)}"
    return None


def parse_args(*extra_dataclasses, argv: list[str] | None = None, defaults: dict | None = None, metric: str | None = None):
    """Parse `FinetuneArguments` plus the script's own dataclasses; a bad combination exits with its reason.

    `defaults` changes shared defaults for one dataset (e.g. `num_crops=4` for video frames). `metric` is the
    recipe's evaluation metric (a `metrics.SCORERS` name): the default --metric_for_best_model, so that
    --load_best_model_at_end and --save_strategy best keep the checkpoint that scores best on it.
    """
    parser = build_parser(*extra_dataclasses)
    if metric:
        parser.set_defaults(metric_for_best_model=metric)
    if defaults:
        parser.set_defaults(**defaults)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        given, unknown = given_fields(parser, argv)
        hint = renamed_option_hint(unknown, argv)
        if hint:
            raise ArgumentError(hint)
        if reason := command_line_refusal(given):
            raise ArgumentError(reason)
        if metric:
            check_best_metric(argv, metric)
        return parser.parse_args_into_dataclasses(args=argv)
    except ArgumentError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except ValueError as error:
        # TrainingArguments' own checks (e.g. an unknown --report_to) in one line too, but whole: their later
        # lines often hold the values that explain the error.
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        parser.exit(2, f"{parser.prog}: error: {message}\n")


__all__ = ["FinetuneArguments", "ArgumentError", "build_parser", "parse_args", "set_launcher_environment", "DEFAULT_DEEPSPEED_CONFIG"]
