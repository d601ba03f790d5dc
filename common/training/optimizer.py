"""A learning rate per part of the model: --vision_learning_rate and --projection_learning_rate.

The optimizer gets one parameter group per part and weight-decay class (`part_groups`): the parts are
`training.parameter_part`'s decoder, vision tower and projection, a LoRA adapter counting as part of the layer it
adapts, and within each part the Trainer's rule applies (`Trainer.get_decay_parameter_names`: no decay on biases and
norms). Empty groups are left out. A run whose parts all share --learning_rate keeps the Trainer's own two groups,
so its optimizer state has the layout that checkpoints written before these flags have.

The Trainer's schedulers are LambdaLRs: each step multiplies every group's own base rate by the same factor, so
warm-up and decay keep the ratios between parts. Under DeepSpeed the Trainer builds the optimizer and the scheduler
when the config has no optimizer or scheduler section (ds_configs/ has none; `FinetuneArguments.check_combinations`
refuses the flags with a config that has one, which would set one rate for every part).

Resume: the rates belong to the run's identity (`run_folder.run_identity`), so a resume with other rates is refused
as one with another --learning_rate is. Taking new rates would not work anyway: the optimizer and scheduler states
of the checkpoint carry its rates and would bring them back.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.trainer_optimizer import is_optimizer_factory

from .model_setup import parameter_part

logger = logging.getLogger(__name__)

PARTS = ("decoder", "vision tower", "projection")


def part_learning_rates(learning_rate: float, vision: float | None = None, projection: float | None = None) -> dict[str, float]:
    """{part: its learning rate}: the vision tower's (--vision_learning_rate) and the projection's
    (--projection_learning_rate) default to `learning_rate`."""
    return {
        "decoder": learning_rate,
        "vision tower": learning_rate if vision is None else vision,
        "projection": learning_rate if projection is None else projection,
    }


def separate_rates(rates: dict[str, float]) -> bool:
    return len(set(rates.values())) > 1


def rate_part(name: str) -> str:
    """The part whose learning rate a parameter takes; a LoRA adapter takes that of the layer it adapts."""
    return parameter_part(name.split(".lora_")[0])


def part_groups(model: nn.Module, rates: dict[str, float], weight_decay: float, decay_names) -> list[dict]:
    """The trainable parameters as optimizer groups, part x weight decay, each with its "lr" (`rates`, from
    `part_learning_rates`) and its "part"; `weight_decay` applies to `decay_names`."""
    decay_names = set(decay_names)
    members: dict[tuple[str, bool], list[nn.Parameter]] = {(part, decay): [] for part in PARTS for decay in (True, False)}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            members[rate_part(name), name in decay_names].append(parameter)
    return [
        {"params": params, "lr": rates[part], "weight_decay": weight_decay if decay else 0.0, "part": part}
        for (part, decay), params in members.items()
        if params
    ]


def log_part_rates(groups: list[dict]) -> None:
    counts: dict[str, int] = {}
    rates: dict[str, float] = {}
    for group in groups:
        # Under ZeRO-3 a parameter is an empty placeholder; ds_numel holds its real size.
        counts[group["part"]] = counts.get(group["part"], 0) + sum(getattr(p, "ds_numel", p.numel()) for p in group["params"])
        rates[group["part"]] = group["lr"]
    lines = ["learning rate per part (optimizer parameter groups):"]
    lines += [f"  {part:<13} {rates[part]:>10.3g}  {counts[part]:>14,} parameters" for part in PARTS if part in counts]
    logger.info("\n".join(lines))


def build_optimizer(trainer, model: nn.Module, groups: list[dict]) -> torch.optim.Optimizer:
    """`groups` in the optimizer that --optim names, made as `Trainer.create_optimizer` makes it."""
    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(kwargs):
        raise ValueError(
            f"--optim {trainer.args.optim} builds its own parameter groups, so --vision_learning_rate and "
            "--projection_learning_rate cannot apply; drop them or choose another --optim (e.g. adamw_torch)"
        )
    optimizer = optimizer_cls(groups, **kwargs)
    if "bitsandbytes" in str(optimizer_cls) and kwargs.get("optim_bits") == 8:
        # As the Trainer does: 8-bit states are unstable for embeddings.
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


__all__ = ["part_learning_rates", "separate_rates", "part_groups", "log_part_rates", "build_optimizer"]
