"""`--torch_compile` for our model: every decoder and CLIP layer compiled on its own (regional compilation).

The Trainer's own `--torch_compile` compiles the whole model, whose forward is data-dependent between the layers
by design: the crop layout comes from the values of `image_sizes`, the number of image positions from
`input_ids`, whether sdpa gets the padding mask or its causal kernel from the mask's values
(`padding_mask_is_redundant`), and the answer-only loss gathers a data-dependent number of labelled positions.
Each of these broke the graph (7 breaks per training forward under `torch._dynamo.explain`), and the shapes they
produce change with every batch. Tensor-only versions exist only at a cost the model avoids on purpose: a dense
(B, 1, L, L) mask for every batch, vocabulary logits at every position. So those steps stay eager, and what is
compiled is what holds the compute: the layers. A layer has no data-dependent step, so each compiles into a
single graph with no break, and layers of one class share their graphs (compiled once, not once per layer), as
in torchtitan's and accelerate's per-block compilation.

Only forwards with gradients enabled (training steps) run compiled. Generation and no-grad evaluation run the same
layers eagerly: transformers' KV cache is indexed by each layer's index, so every decoder layer would compile its
own prefill and decode graphs, past dynamo's recompile limit (8) for a 32-layer decoder, and decoding changes
the cache length at every step.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch._dynamo
import torch._inductor
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

from .deepspeed_config import deepspeed_config

logger = logging.getLogger(__name__)


def decoder_layer_forward(layer, *args, **kwargs):
    # Looked up on the layer's class at each call, so a class that FSDP2 swaps in later (with its own
    # checkpointing wrapper) is the one that runs.
    return type(layer).forward(layer, *args, **kwargs)


def clip_layer_forward(layer, *args, **kwargs):
    return type(layer).forward(layer, *args, **kwargs)


# One function per layer class, not one shared: dynamo keeps at most 8 graphs per function (code object), and
# each class needs several (inputs with and without requires_grad under LoRA, a static first shape, then dynamic
# ones, batch or crop count 1), which one shared function overflowed on the tiny model under LoRA.
COMPILED_LAYERS = {Phi3DecoderLayer: decoder_layer_forward, CLIPEncoderLayer: clip_layer_forward}


def compile_layers(model: torch.nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile each decoder and CLIP layer of `model` (a PeftModel too) in place; returns how many.

    Names, parameters and hooks stay where they are, so saving, resume, DeepSpeed and FSDP see the same module
    tree; compilation itself happens at the first training step.
    """
    compiled = {cls: torch.compile(function, backend=backend, mode=mode) for cls, function in COMPILED_LAYERS.items()}
    layers = [(module, cls) for module in model.modules() for cls in COMPILED_LAYERS if isinstance(module, cls)]
    for layer, cls in layers:
        eager = functools.partial(COMPILED_LAYERS[cls], layer)
        fast = functools.partial(compiled[cls], layer)

        def forward(*args, eager=eager, fast=fast, **kwargs):
            return (fast if torch.is_grad_enabled() else eager)(*args, **kwargs)

        layer.forward = forward
    logger.info(
        "torch.compile (backend %s, mode %s): %d decoder and CLIP layers compiled for training steps; the steps "
        "between layers, generation and no-grad evaluation run eagerly",
        backend, mode or "default", len(layers),
    )
    return len(layers)


def _deepspeed_stage(args) -> int | None:
    return deepspeed_config(args.deepspeed).get("zero_optimization", {}).get("stage")


def compile_refusal(args) -> str | None:
    """Why --torch_compile cannot compile as asked (one line), or None. Parse time: `args` is a FinetuneArguments
    before TrainingArguments fills in the default backend; the default DeepSpeed config (ZeRO-2) needs no check."""
    if not (args.torch_compile or args.torch_compile_backend or args.torch_compile_mode):
        return None
    backend = args.torch_compile_backend or "inductor"
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        return f"--torch_compile_backend {backend} is not a torch.compile backend; choose one of {', '.join(torch._dynamo.list_backends())} (inductor is the default)"
    if args.torch_compile_mode is not None:
        if backend != "inductor":
            return f"--torch_compile_mode is an inductor setting, which the {backend} backend ignores; drop it or use the inductor backend"
        modes = list(torch._inductor.list_mode_options())
        if args.torch_compile_mode not in modes:
            return f"--torch_compile_mode {args.torch_compile_mode} is not an inductor mode; choose one of {', '.join(modes)}"
    if _deepspeed_stage(args) == 3:
        # Measured: every submodule call inside a layer broke the graph (DeepSpeed's parameter hooks).
        return (
            "--torch_compile with ZeRO-3: DeepSpeed gathers each submodule's weights in hooks inside the layers, which "
            "breaks every compiled layer into pieces; use ZeRO-2 (the default), --fsdp on GPUs, or no --torch_compile"
        )
    return None
