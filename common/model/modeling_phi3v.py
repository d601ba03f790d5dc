"""Phi-3.5-vision on transformers' native Phi-3 decoder and CLIP layers, with the official weight names.

Module tree (and therefore state-dict names) mirrors the published checkpoint:
``model.embed_tokens``, ``model.layers.N.*``, ``model.norm``, ``lm_head``,
``model.vision_embed_tokens.img_processor.vision_model.{embeddings,pre_layrnorm,encoder.layers.N}``,
``model.vision_embed_tokens.{glb_GN,sub_GN,img_projection.0,img_projection.2}``.
Only the CLIP layers up to the feature layer (hidden_states[-2]) are built: the last encoder layer and
``post_layernorm`` never affect the output, so their weights in the file are ignored on load.

Token convention (the official processor's): ids < 0 in ``input_ids`` are image positions. They are
filled, in order across the batch, with the projected features of the images in ``pixel_values``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, LogitsProcessorList
from transformers.initialization import copy_, normal_, zeros_
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionEmbeddings
from transformers.models.phi3.modeling_phi3 import Phi3ForCausalLM, Phi3Model, Phi3PreTrainedModel
from transformers.utils import is_flash_attn_2_available

from .configuration_phi3v import Phi3VConfig
from .official_files import with_unused_base_tensors

CROP_SIZE = 336
# The attention kernels the model runs with (`attn_implementation`).
ATTENTION_CHOICES = ("sdpa", "eager", "flash_attention_2")


class Phi3VCLIPEncoder(nn.Module):
    def __init__(self, vision_config, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(vision_config) for _ in range(num_layers)])


class Phi3VCLIPTransformer(nn.Module):
    """CLIP vision transformer truncated at the feature layer; returns that layer's hidden states."""

    def __init__(self, vision_config, num_layers: int):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(vision_config)
        self.pre_layrnorm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.encoder = Phi3VCLIPEncoder(vision_config, num_layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers:
            hidden_states = layer(hidden_states, None)
        return hidden_states


class Phi3VCLIPWrapper(nn.Module):
    """Holds the transformer under the child name ``vision_model`` so the checkpoint's names need no mapping.

    transformers 5 dropped this level from ``CLIPVisionModel`` and renames on load only; the Trainer's resume
    does not rename, so owning the names here keeps resume from silently skipping the tower.
    """

    def __init__(self, vision_config, num_layers: int):
        super().__init__()
        self.vision_model = Phi3VCLIPTransformer(vision_config, num_layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)


class Phi3VImageEmbedding(nn.Module):
    """CLIP features -> 2x2 merge -> tile grid + separators ("sub_glb") -> MLP projection."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        vision_config = config.vision_config
        self.img_processor = Phi3VCLIPWrapper(vision_config, config.num_vision_layers_used)
        self.feature_dim = vision_config.hidden_size * 4
        self.patch_grid = vision_config.image_size // vision_config.patch_size
        if self.patch_grid % 2:
            raise ValueError(f"the 2x2 merge needs an even patch grid, got {self.patch_grid}x{self.patch_grid}")
        self.merged_grid = self.patch_grid // 2
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, self.feature_dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, self.feature_dim))
        self.img_projection = nn.Sequential(
            nn.Linear(self.feature_dim, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )

    def merge_2x2(self, patch_features: torch.Tensor) -> torch.Tensor:
        """(n, g*g, C) patch features -> (n, g/2, g/2, 4C), each 2x2 block ordered (0,0), (0,1), (1,0), (1,1)."""
        n, _, channels = patch_features.shape
        m = self.merged_grid
        blocks = patch_features.reshape(n, m, 2, m, 2, channels).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(n, m, m, 4 * channels)

    def with_row_separators(self, grid: torch.Tensor) -> torch.Tensor:
        """(rows, cols, D) -> (rows * (cols + 1), D): ``sub_GN`` closes every row."""
        rows = grid.shape[0]
        separators = self.sub_GN.reshape(1, 1, -1).expand(rows, 1, -1).to(grid.dtype)
        return torch.cat([grid, separators], dim=1).reshape(-1, grid.shape[-1])

    def layout_image(self, merged_crops: torch.Tensor, tiles_high: int, tiles_wide: int) -> torch.Tensor:
        """One image's merged crops (global first, then row-major tiles) -> its token sequence of features."""
        m = self.merged_grid
        global_grid, tiles = merged_crops[0], merged_crops[1:]
        tile_grid = tiles.reshape(tiles_high, tiles_wide, m, m, -1).permute(0, 2, 1, 3, 4)
        tile_grid = tile_grid.reshape(tiles_high * m, tiles_wide * m, -1)
        return torch.cat(
            [
                self.with_row_separators(tile_grid),
                self.glb_GN.reshape(1, -1).to(tile_grid.dtype),
                self.with_row_separators(global_grid),
            ]
        )

    def forward(self, pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None) -> torch.Tensor:
        """Projected features of all images, concatenated in image order: (total image tokens, hidden); without
        images, `zero_contribution`."""
        if pixel_values is None:
            # Inside forward, so that ZeRO-3 gathers this module's own parameters (glb_GN, sub_GN) on every rank:
            # its hooks fire per module call, and a rank that only called the children would desynchronise.
            return self.zero_contribution()
        grids = [(int(h) // CROP_SIZE, int(w) // CROP_SIZE) for h, w in image_sizes.tolist()]
        # Only real crops go through CLIP: the zero padding tiles carry nothing and cost most of the compute.
        real_crops = torch.cat([pixel_values[i, : 1 + h * w] for i, (h, w) in enumerate(grids)])
        patch_features = self.img_processor(real_crops)[:, 1:]
        merged = self.merge_2x2(patch_features)
        sequences, start = [], 0
        for h, w in grids:
            sequences.append(self.layout_image(merged[start : start + 1 + h * w], h, w))
            start += 1 + h * w
        return self.img_projection(torch.cat(sequences).to(self.projection_dtype))

    @property
    def projection_dtype(self) -> torch.dtype:
        # The bias, not the weight: a quantised weight is stored as bytes but computes in the bias's dtype.
        return self.img_projection[0].bias.dtype

    def zero_contribution(self) -> torch.Tensor:
        """A zero that depends on every trainable parameter, so DDP sees gradients for a batch without images."""
        dummy = torch.zeros(1, 3, CROP_SIZE, CROP_SIZE, device=self.glb_GN.device, dtype=self.glb_GN.dtype)
        merged = self.merge_2x2(self.img_processor(dummy)[:, 1:])
        features = torch.cat([merged.reshape(-1, self.feature_dim), self.glb_GN[0], self.sub_GN[0, 0]])
        return self.img_projection(features.to(self.projection_dtype)).sum() * 0.0


class TextIdsLogitsProcessorList(LogitsProcessorList):
    """Logits processors that see image positions (ids < 0) as id 0, ``<unk>``, which the model never predicts.

    Processors such as the repetition penalty index the vocabulary with the ids generated so far; the
    negative image ids of the prompt would make them fail.
    """

    def __call__(self, input_ids, scores, **kwargs):
        return super().__call__(input_ids.clamp(min=0), scores, **kwargs)


class Phi3VPreTrainedModel(Phi3PreTrainedModel):
    config: Phi3VConfig
    config_class = Phi3VConfig
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Phi3VImageEmbedding):
            zeros_(module.glb_GN)
            zeros_(module.sub_GN)
        elif isinstance(module, CLIPVisionEmbeddings):
            normal_(module.class_embedding, mean=0.0, std=module.embed_dim**-0.5)
            # Non-persistent buffer: never in a checkpoint, so it must be rebuilt after a meta-device load.
            copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))


class Phi3VModel(Phi3VPreTrainedModel, Phi3Model):
    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        # The file holds CLIP layers past the feature layer and post_layernorm (never built), and the
        # reference's second name for the token embedding; none of them is a missing or stray weight.
        tower = r"vision_embed_tokens\.img_processor\.vision_model\."
        self._keys_to_ignore_on_load_unexpected = [tower + r"post_layernorm\.", r"vision_embed_tokens\.wte\."] + [
            tower + rf"encoder\.layers\.{index}\."
            for index in range(config.num_vision_layers_used, config.vision_config.num_hidden_layers)
        ]
        self.post_init()

    def embed_multimodal(self, input_ids, pixel_values=None, image_sizes=None) -> torch.Tensor:
        image_positions = input_ids < 0
        inputs_embeds = self.embed_tokens(input_ids.clamp(min=0))
        num_positions = int(image_positions.sum())
        if num_positions:
            if pixel_values is None or image_sizes is None:
                raise ValueError(
                    f"input_ids hold {num_positions} image positions (ids < 0) but no pixel_values/image_sizes were given"
                )
            features = self.vision_embed_tokens(pixel_values, image_sizes)
            if features.shape[0] != num_positions:
                raise ValueError(
                    f"the images give {features.shape[0]} feature vectors but input_ids hold {num_positions} image "
                    "positions; the text and the images do not belong together (wrong num_crops or image order?)"
                )
            inputs_embeds = inputs_embeds.masked_scatter(image_positions.unsqueeze(-1), features.to(inputs_embeds.dtype))
        elif self.training:
            # Every training forward runs the tower once, with or without images and frozen or not: DDP needs its
            # (zero) gradients, and ZeRO-3 or FSDP gather its weights per module call, collectively, so a rank
            # that skipped it would leave the others waiting.
            inputs_embeds = inputs_embeds + self.vision_embed_tokens(None, None).to(inputs_embeds.dtype)
        return inputs_embeds

    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.embed_multimodal(input_ids, pixel_values, image_sizes)
        return super().forward(input_ids=None, inputs_embeds=inputs_embeds, **kwargs)


class Phi3VForCausalLM(Phi3VPreTrainedModel, Phi3ForCausalLM, GenerationMixin):
    """Phi-3.5-vision for generation and training.

    With ``labels``, logits are computed only where a label exists (answers are a few tokens of thousands);
    the loss equals the usual shifted cross-entropy, and ``logits`` is None. Call without labels for logits.
    A right-padded training batch's padding mask is dropped under sdpa/eager (see
    `padding_mask_is_redundant`): the hidden states of padding positions are then not meaningful, and only
    they.
    """

    _tied_weights_keys = {}

    def __init__(self, config: Phi3VConfig):
        Phi3PreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self._sync_vision_attn_implementation()

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """`PreTrainedModel.save_pretrained`, with the weight names of the checkpoint this model was loaded from:
        the CLIP layer after the feature layer and ``post_layernorm``, which this class does not build, are copied
        from there (`common.model.official_files.unused_base_tensors`), so that the checkpoint's own code and
        loaders that check names strictly read the folder as they read the base. A model built from a config, or
        whose source is gone, saves its own weights alone; an empty `state_dict` (a DeepSpeed save that writes its
        own files instead) stays empty."""
        if self.name_or_path and (state_dict is None or len(state_dict)):
            state_dict = with_unused_base_tensors(self.state_dict() if state_dict is None else state_dict, self.name_or_path)
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    def _sync_vision_attn_implementation(self):
        # The CLIP layers read their own (sub-)config, which transformers updates only for sub-models that are
        # PreTrainedModels; ours is a plain module, so it follows the decoder's choice explicitly.
        self.config.vision_config._attn_implementation_internal = self.config._attn_implementation

    def set_attn_implementation(self, attn_implementation, **kwargs):
        super().set_attn_implementation(attn_implementation, **kwargs)
        self._sync_vision_attn_implementation()

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        if attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
            raise ImportError(
                "attn_implementation='flash_attention_2' needs the flash-attn package and a CUDA GPU, and it is not "
                "installed here. Use attn_implementation='sdpa' (the default; PyTorch picks flash kernels on GPUs by "
                "itself) or install flash-attn (requirements-gpu.txt)."
            )
        return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check=is_init_check, **kwargs)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        image_sizes=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if labels is not None and self.padding_mask_is_redundant(attention_mask, cache):
            attention_mask = None
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if labels is None:
            if isinstance(logits_to_keep, int):
                hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
            else:
                hidden_states = hidden_states[:, logits_to_keep]
            logits, loss = self.lm_head(hidden_states), None
        else:
            logits, loss = None, self.label_positions_loss(hidden_states, labels, num_items_in_batch)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def padding_mask_is_redundant(self, attention_mask, cache) -> bool:
        """True for a right-padded 2D mask in a cache-free sdpa/eager forward with labels.

        Causal attention already keeps every real token from seeing the padding after it, and padded positions
        carry label -100, so the loss and its gradients are the same without the mask. Without it sdpa runs its
        causal kernel (flash on GPU, block-skipping on CPU) instead of a dense (B, 1, L, L) mask. Flash
        attention keeps the mask: its varlen path skips the padding altogether.
        """
        if attention_mask is None or attention_mask.ndim != 2 or cache is not None:
            return False
        if self.config._attn_implementation not in ("sdpa", "eager"):
            return False
        return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())

    def label_positions_loss(self, hidden_states, labels, num_items_in_batch=None) -> torch.Tensor:
        """Shifted next-token cross-entropy, projecting to the vocabulary only at labelled positions."""
        targets = labels[:, 1:].to(hidden_states.device)
        # Any negative label is ignored, not only -100: labels copied from input_ids hold image ids < 0.
        keep = targets >= 0
        logits = self.lm_head(hidden_states[:, :-1][keep]).float()
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
        if torch.is_tensor(denominator):
            denominator = denominator.to(loss.device)
        return loss / denominator

    def _get_logits_processor(self, *args, **kwargs) -> LogitsProcessorList:
        return TextIdsLogitsProcessorList(super()._get_logits_processor(*args, **kwargs))

    def prepare_inputs_for_generation(self, input_ids, pixel_values=None, image_sizes=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        # Images are needed exactly when the ids fed this step hold image positions: at prefill, and again
        # when the longrope switch past 4096 positions drops the cache and re-runs the whole sequence.
        fed_ids = model_inputs.get("input_ids")
        if fed_ids is not None and bool((fed_ids < 0).any()):
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_sizes"] = image_sizes
        return model_inputs


__all__ = ["Phi3VForCausalLM", "Phi3VModel", "Phi3VPreTrainedModel", "Phi3VImageEmbedding"]

# Registered so AutoConfig/AutoModelForCausalLM resolve "phi3_v" to these classes, never to the hub's remote code.
AutoConfig.register("phi3_v", Phi3VConfig, exist_ok=True)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
