"""Loading the model and processor, and the one builder for the four training modes.

Modes (`FinetuneArguments.training_mode`):
- ``full``: every weight trains (DeepSpeed ZeRO-2 by default).
- ``frozen_vision``: the CLIP tower, separators and projection are frozen; the decoder, its token
  embeddings included, trains. (The reference recipe froze the embeddings by accident: its image module
  held the token embedding under a second name.)
- ``lora``: a frozen base with LoRA adapters on the decoder's qkv/o/gate_up/down projections and lm_head,
  plus CLIP's q/k/v/out/fc1/fc2 and the image projection unless the vision tower is frozen.
- ``qlora``: ``lora`` on a 4-bit nf4 base computing in bf16/fp16.

Precision (`FinetuneArguments.choose_precision`, stated in the log from `FinetuneArguments.precision`): --bf16 trains bf16
weights; fp16 mixed precision (the GPU default) and --fp32 train fp32 weights, the first computing in fp16 under
autocast with a loss scaler. Under DeepSpeed its engine casts the model to its own dtype instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from huggingface_hub.errors import EntryNotFoundError
from transformers import BitsAndBytesConfig
from transformers.integrations import is_deepspeed_zero3_enabled

from ..errors import error_reason
from ..model.modeling_phi3v import Phi3VForCausalLM
from ..model.official_files import base_checkpoint, warn_if_code_is_missing
from ..model.processing_phi3v import Phi3VProcessor
from ..ranks import is_main_process
from .compile import compile_layers as compile_layers_of

logger = logging.getLogger(__name__)

DECODER_LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))|lm_head"
VISION_LORA_TARGETS = (
    r"model\.vision_embed_tokens\.img_processor\.vision_model\.encoder\.layers\.\d+\."
    r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
    r"|model\.vision_embed_tokens\.img_projection\.(0|2)"
)
# Kept in 16-bit under QLoRA: lm_head is a LoRA target, and the small projection is the image interface.
QLORA_SKIP_MODULES = ["lm_head", "model.vision_embed_tokens.img_projection"]


class UnsafeCheckpointError(RuntimeError):
    pass


def checkpoint_not_found(source: str, what: str, error: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"could not load the {what} from {source}: {error_reason(error)}. Give a local checkpoint folder, or a hub "
        "id with network access (log in with `hf auth login` for gated repos)"
    )


def load_processor(source: str, num_crops: int) -> Phi3VProcessor:
    """The base's processor at `num_crops`. Being a run's first read of the base, it also pins a hub base's commit
    and fetches its code files (`common.model.official_files.base_checkpoint`), warning once if the outputs cannot
    carry them."""
    try:
        processor = Phi3VProcessor.from_pretrained(source, num_crops=num_crops)
    except OSError as error:
        raise checkpoint_not_found(source, "processor", error) from error
    base = base_checkpoint(source)
    if is_main_process():
        warn_if_code_is_missing(base)
    return processor


def load_model(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: torch.device | str = "cpu",
    qlora_compute_dtype: torch.dtype | None = None,
    allow_pickle_weights: bool = False,
    liger_kernels: bool = False,
) -> Phi3VForCausalLM:
    """The model in `source` (a folder or a hub id), its weights in `dtype`; with `qlora_compute_dtype`, its linear
    layers as 4-bit NF4 computing in that dtype (QLoRA), packed on `device`. `FinetuneArguments.model_loading`
    gives a run's values.

    Weights load from safetensors only: a pickle checkpoint can run arbitrary code when read, so it is refused
    unless `allow_pickle_weights` (--allow_pickle_weights).
    """
    source = str(source)
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation, "use_safetensors": None if allow_pickle_weights else True}
    if qlora_compute_dtype is not None:
        # 4-bit weights are packed for the device they load on and cannot be moved afterwards.
        kwargs["device_map"] = {"": device}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=qlora_compute_dtype,
            llm_int8_skip_modules=QLORA_SKIP_MODULES,
        )
    if is_deepspeed_zero3_enabled():
        # ZeRO-3 partitions the weights while they load, so DeepSpeed's process group must exist before that.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if torch.device(device).type == "cpu" else "nccl")
    try:
        model = Phi3VForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, EntryNotFoundError) as error:
        if not allow_pickle_weights and ".safetensors" in str(error):
            raise UnsafeCheckpointError(
                f"{source} has no safetensors weights. Pickle (.bin) weights can execute code when loaded, so they "
                "are refused; convert them to safetensors, or pass --allow_pickle_weights if you trust the source."
            ) from error
        raise checkpoint_not_found(source, "model", error) from error
    model.config.use_cache = False
    if liger_kernels:
        apply_liger_kernels(model)
    return model


def apply_liger_kernels(model: Phi3VForCausalLM) -> None:
    """Liger's fused RMSNorm, SwiGLU and RoPE on the decoder, which is transformers' Phi-3.

    Its fused linear cross-entropy is not used: the model already projects to the vocabulary only at the
    few labelled positions, which removes the memory that kernel exists to save.
    """
    from liger_kernel.transformers import apply_liger_kernel_to_phi3

    apply_liger_kernel_to_phi3(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    logger.info("Liger kernels applied to the decoder: RMSNorm, SwiGLU, RoPE")


def to_device(model, device: torch.device):
    """The model on `device`; a 4-bit model already loaded there (see `load_model`)."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(getattr(model, "base_model", None), "is_loaded_in_4bit", False):
        return model
    return model.to(device)


def setup_training_mode(
    model: Phi3VForCausalLM,
    mode: str,
    *,
    lora_rank: int = 64,
    lora_alpha_ratio: float = 2.0,
    lora_dropout: float = 0.0,
    lora_vision: bool = True,
    seed: int | None = None,
    compile_layers: dict | None = None,
):
    """Freeze (`mode` "frozen_vision"), or wrap in LoRA ("lora", "qlora"; adapters on the vision tower too when
    `lora_vision`), and compile its layers with `compile_layers` (`compile.compile_layers`'s settings); returns
    the model to train (maybe a PeftModel) after logging its trainable parameters per part.
    `FinetuneArguments.training_mode_settings` gives a run's values."""
    if mode == "frozen_vision":
        model.model.vision_embed_tokens.requires_grad_(False)
    elif mode in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_rank * lora_alpha_ratio,
            lora_dropout=lora_dropout,
            target_modules=f"{DECODER_LORA_TARGETS}|{VISION_LORA_TARGETS}" if lora_vision else DECODER_LORA_TARGETS,
            init_lora_weights="gaussian",
            task_type="CAUSAL_LM",
        )
        if seed is not None:
            # The adapter's random initial weights follow --seed (the Trainer seeds only once the model exists),
            # so that two runs of one command train the same model.
            torch.manual_seed(seed)
        model = get_peft_model(model, config)
        save_adapter_weights_only(model)
    elif mode != "full":
        raise ValueError(f"unknown training mode {mode!r}: full, frozen_vision, lora or qlora")
    log_trainable_parameters(model, mode)
    if compile_layers:
        compile_layers_of(model, **compile_layers)
    return model


def save_adapter_weights_only(peft_model) -> None:
    """Make every save of this PEFT model (the Trainer's included) write the LoRA tensors only.

    peft's default saves a full copy of lm_head whenever lm_head is a LoRA target (it counts as an embedding
    layer), about 200 MB in bf16 per adapter for this model. That copy is needed only when the vocabulary was
    resized, so it is kept for that case alone.
    """
    save_pretrained = peft_model.save_pretrained
    base_rows = peft_model.get_input_embeddings().num_embeddings

    def save_without_base_weights(*args, **kwargs):
        resized = peft_model.get_input_embeddings().num_embeddings != base_rows
        kwargs.setdefault("save_embedding_layers", resized)
        return save_pretrained(*args, **kwargs)

    peft_model.save_pretrained = save_without_base_weights


def parameter_part(name: str) -> str:
    if "lora_" in name:
        return "lora"
    if ".img_processor." in name:
        return "vision tower"
    if "img_projection" in name or "glb_GN" in name or "sub_GN" in name:
        return "projection"
    return "decoder"


def trainable_parameters_by_part(model) -> dict[str, tuple[int, int]]:
    """{part: (trainable, total)} over the decoder, vision tower, projection and LoRA adapters."""
    counts: dict[str, list[int]] = {}
    for name, parameter in model.named_parameters():
        # 4-bit weights pack two values per byte; count the logical parameters.
        numel = parameter.numel() * (2 if parameter.dtype == torch.uint8 else 1)
        entry = counts.setdefault(parameter_part(name), [0, 0])
        entry[1] += numel
        if parameter.requires_grad:
            entry[0] += numel
    return {part: (trainable, total) for part, (trainable, total) in counts.items()}


def log_trainable_parameters(model, mode: str) -> dict[str, tuple[int, int]]:
    parts = trainable_parameters_by_part(model)
    lines = [f"training mode: {mode}; trainable parameters per part:"]
    for part in ("decoder", "vision tower", "projection", "lora"):
        if part in parts:
            trainable, total = parts[part]
            lines.append(f"  {part:<13} {trainable:>14,} of {total:>14,} trainable")
    logger.info("\n".join(lines))
    return parts
