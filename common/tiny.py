"""Write a small random-weight Phi-3.5-vision checkpoint in the official file layout.

    python -m common.tiny --out DIR [--vision tiny|clip-l] [--hidden_size 64] [--num_layers 2] [--seed 0]

DIR then holds config.json (official keys: "su" rope scaling, embd_layer, img_processor, even the
``_attn_implementation``/``auto_map`` entries the published file carries), model.safetensors with the
official weight names (including the unused last CLIP layer and post_layernorm, as in the real file),
generation_config.json, preprocessor_config.json, processor_config.json and the tokenizer files of the
official layout (tokenizer_config.json naming LlamaTokenizer, with the Phi-3 special tokens and chat
template). Every script accepts DIR as ``--model_name_or_path``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .official_files import write_tokenizer_files
from .configuration_phi3v import CLIP_VIT_L_14_336, Phi3VConfig
from .modeling_phi3v import Phi3VForCausalLM
from .tiny_tokenizer import build_tiny_tokenizer

# 64 wide, not less: bitsandbytes' CPU 4-bit kernels need in_features >= their 64-value block.
TINY_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "patch_size": 14,
    "image_size": 336,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
VISION_PRESETS = {"tiny": TINY_VISION, "clip-l": CLIP_VIT_L_14_336}

PREPROCESSOR_CONFIG = {
    "auto_map": {
        "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
    },
    "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Phi3VImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "num_crops": 4,
    "num_img_tokens": 144,
    "processor_class": "Phi3VProcessor",
}
PROCESSOR_CONFIG = {
    "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
    "processor_class": "Phi3VProcessor",
}


def longrope_factors(head_dim: int, seed: int) -> tuple[list[float], list[float]]:
    generator = torch.Generator().manual_seed(seed)
    half = head_dim // 2
    short = (1.0 + 0.1 * torch.rand(half, generator=generator)).tolist()
    long = torch.linspace(1.0, 40.0, half).tolist()
    return short, long


def official_config_dict(hidden_size: int, num_layers: int, num_heads: int, vision: dict, seed: int) -> dict:
    short_factor, long_factor = longrope_factors(hidden_size // num_heads, seed)
    return {
        "_name_or_path": "phi3v-recipes/tiny-random",
        "architectures": ["Phi3VForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_phi3_v.Phi3VConfig",
            "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
        },
        "_attn_implementation": "flash_attention_2",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "embd_pdrop": 0.0,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "img_processor": {
            "image_dim_out": vision["hidden_size"],
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
        },
        "initializer_range": 0.02,
        "intermediate_size": 2 * hidden_size,
        "max_position_embeddings": 131072,
        "model_type": "phi3_v",
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_heads,
        "original_max_position_embeddings": 4096,
        "pad_token_id": 32000,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": long_factor, "short_factor": short_factor, "type": "su"},
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.38.1",
        "use_cache": True,
        "vision_config": dict(vision),
        "vocab_size": 32064,
    }


def build_tiny_checkpoint(
    out_dir: str | Path,
    vision: str = "tiny",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write the checkpoint and return its folder."""
    if vision not in VISION_PRESETS:
        raise ValueError(f"--vision must be one of {sorted(VISION_PRESETS)}, got {vision!r}")
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(f"hidden_size {hidden_size} must split into {num_heads} heads of even size")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_dict = official_config_dict(hidden_size, num_layers, num_heads, VISION_PRESETS[vision], seed)

    torch.manual_seed(seed)
    model = Phi3VForCausalLM(Phi3VConfig(**config_dict))
    # Zero separators would make every newline identical to padding; random ones look like trained weights.
    with torch.no_grad():
        model.model.vision_embed_tokens.glb_GN.normal_(std=0.02)
        model.model.vision_embed_tokens.sub_GN.normal_(std=0.02)
    model.save_pretrained(out)
    add_unused_vision_weights(out / "model.safetensors", config_dict["vision_config"], seed)
    # The official config.json is the contract the loader must read, not the one save_pretrained writes.
    (out / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000, "_from_model_config": True}, indent=2)
        + "\n"
    )
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    (out / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2) + "\n")
    write_tokenizer_files(build_tiny_tokenizer(), out, base=None)
    return out


def add_unused_vision_weights(safetensors_path: Path, vision: dict, seed: int) -> None:
    """Add the last CLIP layer and post_layernorm that the published file carries but the model never uses."""
    tensors = load_file(str(safetensors_path))
    generator = torch.Generator().manual_seed(seed + 1)
    prefix = "model.vision_embed_tokens.img_processor.vision_model."
    last = vision["num_hidden_layers"] - 1
    width, inner = vision["hidden_size"], vision["intermediate_size"]
    shapes = {
        f"encoder.layers.{last}.self_attn.{name}.weight": (width, width) for name in ("q_proj", "k_proj", "v_proj", "out_proj")
    }
    shapes.update({f"encoder.layers.{last}.self_attn.{name}.bias": (width,) for name in ("q_proj", "k_proj", "v_proj", "out_proj")})
    shapes.update(
        {
            f"encoder.layers.{last}.layer_norm1.weight": (width,),
            f"encoder.layers.{last}.layer_norm1.bias": (width,),
            f"encoder.layers.{last}.layer_norm2.weight": (width,),
            f"encoder.layers.{last}.layer_norm2.bias": (width,),
            f"encoder.layers.{last}.mlp.fc1.weight": (inner, width),
            f"encoder.layers.{last}.mlp.fc1.bias": (inner,),
            f"encoder.layers.{last}.mlp.fc2.weight": (width, inner),
            f"encoder.layers.{last}.mlp.fc2.bias": (width,),
            "post_layernorm.weight": (width,),
            "post_layernorm.bias": (width,),
        }
    )
    for name, shape in shapes.items():
        tensors[prefix + name] = torch.randn(shape, generator=generator) / math.sqrt(shape[-1])
    save_file(tensors, str(safetensors_path), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the checkpoint into")
    parser.add_argument("--vision", default="tiny", choices=sorted(VISION_PRESETS), help="vision tower size")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny_checkpoint(args.out, args.vision, args.hidden_size, args.num_layers, args.num_heads, args.seed)
    print(f"wrote a tiny random Phi-3.5-vision checkpoint to {out}")


if __name__ == "__main__":
    main()
