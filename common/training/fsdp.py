"""FSDP2 (PyTorch's ``fully_shard``) for full and frozen-vision training: the alternative to DeepSpeed ZeRO.

With ``--fsdp`` the recipes give the Trainer an FSDP2 configuration (`configure_fsdp`) that accelerate applies
on GPUs: one FSDP unit per decoder layer and per CLIP encoder layer (`WRAPPED_LAYERS`), accelerate's units
for the token embedding and for the final norm with ``lm_head``, the rest of the model in the root unit;
FSDP's own activation checkpointing in place of transformers'; and every save gathering a full state dict
on rank 0. Checkpoints and the final model therefore hold model.safetensors in the official format, as
without FSDP; a checkpoint also holds accelerate's ``pytorch_model_fsdp.bin`` and ``optimizer.bin``, which
resume reads.

accelerate runs FSDP on accelerators only: on CPU it ignores the plugin and trains plain DDP without a
word, so ``--fsdp`` is refused there (`fsdp_refusal`). The CPU tests drive torch's FSDP2 over gloo directly
with `shard_model` and `full_state_dict`, which follow the rules accelerate 1.15 applies for the Trainer.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from ..io import json_object
from .deepspeed_config import NO_DEEPSPEED

__all__ = ["WRAPPED_LAYERS", "FSDP_OPTIONS", "fsdp_refusal", "configure_fsdp", "shard_model", "full_state_dict"]

# The decoder's and the CLIP tower's layer classes (common/model/modeling_phi3v.py): each instance is one FSDP unit,
# whose weights are gathered for its forward and backward only.
WRAPPED_LAYERS = ("Phi3DecoderLayer", "CLIPEncoderLayer")
# What the words of --fsdp mean under FSDP2 (the spelling of transformers 4.x, which also took FSDP1's).
FSDP_OPTIONS = {
    # Parameters, gradients and optimizer states sharded; each unit's weights freed after its forward and
    # gathered again for its backward: the memory of ZeRO-3.
    "full_shard": {"reshard_after_forward": True},
    # Weights kept whole from a unit's forward to its backward: one all-gather less per unit and step, the
    # memory of ZeRO-2 at the peak.
    "shard_grad_op": {"reshard_after_forward": False},
    # Sharded parameters, gradients and optimizer states in CPU memory, the optimizer step on the CPU.
    "offload": {"cpu_offload": True},
    # Always on: the units are WRAPPED_LAYERS.
    "auto_wrap": {},
}
TRAINER_CONFIG = {
    "version": 2,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "transformer_layer_cls_to_wrap": list(WRAPPED_LAYERS),
    # The Trainer writes model.safetensors (and so our official format) only from a full state dict.
    "state_dict_type": "FULL_STATE_DICT",
}


def _option_words(fsdp) -> list[str]:
    return [] if fsdp is True or fsdp in ("true", "True") else str(fsdp).split()


def _user_config(value) -> dict:
    """--fsdp_config as a dict (inline JSON, a JSON file or a dict), keys without the optional ``fsdp_`` prefix."""
    if not value:
        return {}
    value = json_object("--fsdp_config", value)
    return {key.removeprefix("fsdp_"): setting for key, setting in value.items()}


def fsdp_refusal(args) -> str | None:
    """Why these --fsdp settings cannot train what they ask for (one line), or None. Parse time, so nothing
    has loaded yet; `args` is a FinetuneArguments before its own defaults are applied."""
    if not args.fsdp:
        return "--fsdp_config does nothing without --fsdp; add --fsdp" if args.fsdp_config else None
    if args.use_cpu:
        return (
            "--fsdp needs CUDA GPUs: on CPU accelerate ignores it and would train plain DDP instead; to shard on CPU "
            "use --deepspeed ds_configs/zero3.json"
        )
    if args.deepspeed is not None and args.deepspeed not in NO_DEEPSPEED:
        return "--fsdp and --deepspeed exclude each other (each shards the model its own way); give one of them"
    if args.use_lora or args.use_qlora:
        # Untested here, and accelerate leaves QLoRA's uint8-packed 4-bit weights unsharded anyway.
        return "--fsdp shards full and frozen-vision training only; train LoRA and QLoRA without it (DDP)"
    unknown = [word for word in _option_words(args.fsdp) if word not in FSDP_OPTIONS]
    if unknown:
        return f"--fsdp {' '.join(unknown)}: these recipes run FSDP2, which takes {', '.join(FSDP_OPTIONS)} (or --fsdp alone)"
    try:
        config = _user_config(args.fsdp_config)
    except ValueError as error:
        return str(error)
    if int(config.get("version", 2)) != 2:
        return "--fsdp_config version 1: FSDP1 is deprecated in transformers 5.24; these recipes run FSDP2, drop version"
    if str(config.get("state_dict_type", "FULL_STATE_DICT")).upper() != "FULL_STATE_DICT":
        return (
            f"--fsdp_config state_dict_type {config['state_dict_type']}: the Trainer then writes no model.safetensors, "
            "so no final model; drop state_dict_type (full state dicts, gathered on rank 0)"
        )
    if str(config.get("xla", False)).lower() == "true":
        return "--fsdp_config xla: these recipes run FSDP2 on CUDA GPUs; drop xla"
    return None


def configure_fsdp(args) -> None:
    """Turn --fsdp (checked by `fsdp_refusal`) into the Trainer's FSDP2 settings: `TRAINER_CONFIG`, then what
    the words of --fsdp mean (`FSDP_OPTIONS`), then the user's --fsdp_config, each overriding the one before.

    Activation checkpointing (on by default in these recipes) becomes FSDP's own, applied to the same layers
    before sharding: the Trainer refuses it together with transformers' checkpointing, and transformers'
    inside an FSDP unit gathers the unit's weights once more in the backward pass.
    """
    checkpointing = args.activation_checkpointing
    if checkpointing is None:
        checkpointing = bool(args.gradient_checkpointing)
    config = {**TRAINER_CONFIG, "activation_checkpointing": bool(checkpointing)}
    for word in _option_words(args.fsdp):
        config.update(FSDP_OPTIONS[word])
    config.update(_user_config(args.fsdp_config))
    args.fsdp, args.fsdp_config = True, config
    args.activation_checkpointing = False


def _is_layer(module) -> bool:
    return type(module).__name__ in WRAPPED_LAYERS


def shard_model(model, activation_checkpointing: bool = False, mp_policy: MixedPrecisionPolicy | None = None, **fsdp_kwargs):
    """Shard `model` (a Phi3VForCausalLM) in place with FSDP2 as accelerate 1.15 does for the Trainer
    (`fsdp2_prepare_model`): checkpoint wrappers first if asked, a unit per WRAPPED_LAYERS module, one for the
    token embedding, one for the final norm with lm_head (kept whole after forward: backward starts there),
    then the root; ``generate`` runs as a forward of the root, as the Trainer registers it. Needs an
    initialised process group; `fsdp_kwargs` go to every ``fully_shard`` (``reshard_after_forward``, ``mesh``)."""
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for name, module in list(model.named_modules()):
            if _is_layer(module):
                model.set_submodule(name, checkpoint_wrapper(module, preserve_rng_state=False))
    kwargs = {"mp_policy": mp_policy or MixedPrecisionPolicy(), **fsdp_kwargs}
    # The layer inside its checkpoint wrapper is the unit, so the recomputation in backward gathers it again.
    for module in [module for module in model.modules() if _is_layer(module)]:
        fully_shard(module, **kwargs)
    fully_shard(model.get_input_embeddings(), **kwargs)
    fully_shard([model.model.norm, model.get_output_embeddings()], **{**kwargs, "reshard_after_forward": False})
    fully_shard(model, **{key: value for key, value in kwargs.items() if key != "reshard_after_forward"})
    register_fsdp_forward_method(model, "generate")
    return model


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP2 model on rank 0, on the CPU, with the model's own names (no checkpoint
    wrapper in them); an empty dict on the other ranks. Every rank must call it. The Trainer's FSDP save
    (``accelerator.get_state_dict``) gathers exactly this and hands it to ``save_pretrained``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
