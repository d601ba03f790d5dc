"""Configuration of Phi-3.5-vision that reads the published ``config.json`` as it is.

The published file was written for remote code on transformers 4.x. Three of its keys need care on 5.x:
``rope_scaling`` of type "su" (native Phi-3 calls it "longrope" but validates before renaming),
``_attn_implementation: flash_attention_2`` (5.x would apply it and fail without flash-attn), and
``auto_map`` (points at the checkpoint's own .py files, which our classes never run).
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.phi3.configuration_phi3 import Phi3Config

# The official config names the tower by hub id only; these are the shapes that id implies.
CLIP_VIT_L_14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}

DEFAULT_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}

DEFAULT_IMG_PROCESSOR = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": 144,
}


@strict
class Phi3VConfig(Phi3Config):
    """Phi-3 decoder settings plus the image embedding (``embd_layer``, ``img_processor``).

    ``vision_config`` is optional: when absent (as in the published file) it is the CLIP ViT-L/14-336
    implied by ``img_processor.model_name``; tests and demos set a smaller tower explicitly.
    """

    model_type = "phi3_v"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=CLIP_VIT_L_14_336),
    }

    embd_layer: dict | None = None
    img_processor: dict | None = None
    vision_config: dict | CLIPVisionConfig | None = None

    def __post_init__(self, **kwargs):
        # We choose the attention implementation at load time; the file's flash_attention_2 must not win.
        kwargs.pop("_attn_implementation", None)
        kwargs.pop("auto_map", None)
        self.embd_layer = {**DEFAULT_EMBD_LAYER, **(self.embd_layer or {})}
        self.img_processor = {**DEFAULT_IMG_PROCESSOR, **(self.img_processor or {})}
        unsupported = {
            key: self.embd_layer[key]
            for key, expected in (("hd_transform_order", "sub_glb"), ("projection_cls", "mlp"), ("use_hd_transform", True))
            if self.embd_layer[key] != expected
        }
        if unsupported:
            raise ValueError(f"Phi3VConfig supports only the published image embedding; unsupported embd_layer values: {unsupported}")
        super().__post_init__(**kwargs)

    def convert_rope_params_to_dict(self, **kwargs):
        # The parent validates rope keys before its own su -> longrope rename, and "su" fails that validation.
        rope = kwargs.get("rope_scaling") or self.rope_parameters
        if isinstance(rope, dict) and rope.get("type", rope.get("rope_type")) == "su":
            rope = {key: value for key, value in rope.items() if key != "type"}
            rope["rope_type"] = "longrope"
            # The value longrope derives from these two anyway (131072 / 4096 = 32); stating it avoids a warning.
            rope.setdefault("factor", self.max_position_embeddings / self.original_max_position_embeddings)
            if "rope_scaling" in kwargs:
                kwargs["rope_scaling"] = rope
            else:
                self.rope_parameters = rope
        return super().convert_rope_params_to_dict(**kwargs)

    @property
    def vision_feature_layer(self) -> int:
        return int(self.img_processor.get("layer_idx", -2))

    @property
    def num_vision_layers_used(self) -> int:
        """Encoder layers needed to produce hidden_states[layer_idx]; the rest never affect the output."""
        layer_idx = self.vision_feature_layer
        total = self.vision_config.num_hidden_layers
        used = layer_idx if layer_idx >= 0 else total + 1 + layer_idx
        if not 0 < used <= total:
            raise ValueError(f"img_processor.layer_idx={layer_idx} is outside the {total}-layer vision tower")
        return used

    def to_dict(self):
        output = super().to_dict()
        output.pop("auto_map", None)
        return output

    def official_dict(self) -> dict:
        """This config in the published file's keys and forms, which the checkpoint's own code (transformers
        4.x) and vLLM read: ``rope_scaling`` ``{"type": "su", ...}`` and ``rope_theta`` instead of
        transformers 5's ``rope_parameters``, ``torch_dtype`` instead of ``dtype``, and no ``vision_config`` for
        the standard CLIP ViT-L/14-336 tower (the published file names it by ``img_processor.model_name``).
        ``auto_map`` depends on where the code lives, so `common.outputs.export` adds it."""
        output = self.to_diff_dict()
        rope = output.pop("rope_parameters", None) or {}
        output["rope_theta"] = rope.get("rope_theta", 10000.0)
        if rope.get("rope_type") == "longrope":
            output["rope_scaling"] = {"type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}
        else:
            output["rope_scaling"] = None
        output["torch_dtype"] = output.pop("dtype", None) or "float32"
        vision = output.pop("vision_config", None)
        if vision is not None and not _is_standard_tower(vision):
            output["vision_config"] = vision
        return output

    def to_json_file(self, json_file_path, use_diff: bool = True):
        # Every save (save_pretrained, the Trainer's checkpoints) writes the published form; transformers 5's
        # form stays in memory only, as reading the published form back gives the same config.
        Path(json_file_path).write_text(json.dumps(self.official_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _is_standard_tower(vision: dict) -> bool:
    return all(vision.get(key) == value for key, value in CLIP_VIT_L_14_336.items() if key != "projection_dim")


__all__ = ["Phi3VConfig", "CLIP_VIT_L_14_336"]
