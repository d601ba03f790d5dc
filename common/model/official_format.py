"""Model folders in the official checkpoint's format: what every folder a run or an export writes holds.

Every folder a run writes that holds a model (the final model, ``checkpoint-N``, ``OUTPUT_DIR/merged``) is laid
out like ``microsoft/Phi-3.5-vision-instruct`` and holds everything needed to load it without the hub. What makes
it so:

- config.json in the published keys and forms (`Phi3VConfig.official_dict`) plus the base's ``auto_map``, and
  the base's name and commit (``_name_or_path``, ``_revision``) when it came from the hub;
- generation_config.json stopping at every id the evaluation stops at (`stop_token_ids`);
- tokenizer and processor files in the 4.x form (`Phi3VProcessor.save_pretrained` writes them with
  `common.model.official_files.write_processor_files`), with the ``num_crops`` the run trained with;
- the checkpoint's own code, copied unchanged: a local base folder's ``.py`` files, or those of the hub base's
  commit, fetched into the hub cache when the run starts (`base_checkpoint`). ``auto_map`` entries stay local
  (``module.Class``) and only name modules the folder holds; we never write or ship that code ourselves;
- the base's full set of weight names: the unused last CLIP layer and ``post_layernorm``, which our model does
  not build, are copied from the base (`Phi3VForCausalLM.save_pretrained`; `finalize_weights` for folders written
  otherwise). Final models (`finalize_weights`) are written in the base checkpoint's dtype (or ``--save_dtype``);
  checkpoints for resume keep the training precision.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..dtypes import dtype_name
from ..errors import ExportError
from ..io import follow_umask_in, replace_atomically
from .modeling_phi3v import Phi3VForCausalLM
from .official_files import SAFE_INDEX, SAFE_WEIGHTS, BaseCheckpoint, base_checkpoint, copy_code_files, unused_base_tensors, write_json
from .processing_phi3v import stop_token_ids

def write_generation_config(folder: Path, base: BaseCheckpoint, tokenizer) -> None:
    """The base's generation_config.json with every stop id: the hub file stops only at ``</s>``, so a
    fine-tuned model served from it would run past the ``<|end|>`` it learnt to emit."""
    config = base.json("generation_config.json") or {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config.pop("transformers_version", None)
    config["eos_token_id"] = stop_token_ids(tokenizer)
    # true would let transformers rebuild the generation config from config.json, whose eos is only </s>.
    config["_from_model_config"] = False
    write_json(folder / "generation_config.json", config)


def complete_model_folder(folder: str | Path, base_source: str | os.PathLike | BaseCheckpoint, tokenizer) -> None:
    """Everything around the weights of a saved model folder: auto_map, provenance, generation config, code files.

    Run after ``save_pretrained`` wrote config.json (already in the published form) and the weights.
    """
    folder, base = Path(folder), base_checkpoint(base_source)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    base_config = base.json("config.json")
    config.pop("auto_map", None)
    auto_map = base.auto_map("config.json")
    if auto_map:
        config["auto_map"] = auto_map
    config.update(base.provenance())
    # The published file selects flash attention for its own code; keeping the base's choice keeps that code
    # behaving as it does on the base (users switch it with attn_implementation, as documented for the base).
    if "_attn_implementation" in base_config:
        config["_attn_implementation"] = base_config["_attn_implementation"]
    # Training turns the cache off; a served model without it would recompute the whole prefix per token.
    config["use_cache"] = base_config.get("use_cache", True)
    write_json(config_path, dict(sorted(config.items())))
    write_generation_config(folder, base, tokenizer)
    copy_code_files(base, folder)
    follow_umask_in(folder)


def finalize_weights(folder: str | Path, base_source: str | os.PathLike, dtype: torch.dtype | None = None) -> torch.dtype:
    """Cast a saved model's floating-point weights to `dtype` (default: the base's) and add the base's unused
    tower tensors; config.json's ``torch_dtype`` then says what the files hold. Returns the dtype written."""
    folder, base = Path(folder), base_checkpoint(base_source)
    dtype = dtype or base.torch_dtype()
    index_path = folder / SAFE_INDEX
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    shards = sorted(set(index["weight_map"].values())) if index else [SAFE_WEIGHTS]
    if not all((folder / shard).is_file() for shard in shards):
        raise ExportError(f"{folder}: no safetensors weights ({', '.join(shards)}); save the model with safetensors first")
    present = set()
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as handle:
            present.update(handle.keys())
    extra = unused_base_tensors(base, present)
    total_bytes = 0
    for position, shard in enumerate(tqdm(shards, desc=f"writing {dtype_name(dtype)} weights", unit="shard")):
        tensors = load_file(str(folder / shard))
        if position == len(shards) - 1:
            tensors.update(extra)
            if index:
                index["weight_map"].update({name: shard for name in extra})
        tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        replace_atomically(folder / shard, lambda path, tensors=tensors: save_file(tensors, str(path), metadata={"format": "pt"}))
        del tensors
    if index:
        index.setdefault("metadata", {})["total_size"] = total_bytes
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        write_json(index_path, index)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["torch_dtype"] = dtype_name(dtype)
    write_json(config_path, config)
    return dtype


def write_final_model(model, processor, folder: str | Path, base_source: str | os.PathLike, dtype: torch.dtype | None = None) -> torch.dtype:
    """A whole model (e.g. LoRA merged into its base) as a final output folder; returns the weights' dtype."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    complete_model_folder(folder, base_source, processor.tokenizer)
    return finalize_weights(folder, base_source, dtype)


def mismatch_reason(error: RuntimeError) -> str | None:
    """The first "size mismatch" line of a state-dict load, or None for any other error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip().startswith("size mismatch")]
    return lines[0] if lines else None


def with_adapter(model, adapter: Path, mismatch_error):
    """`model` with the LoRA adapter in `adapter` applied (a PeftModel); an adapter trained on another base, whose
    shapes do not fit, raises ``mismatch_error(reason)`` (the first size mismatch) instead of PEFT's long error."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except RuntimeError as error:
        reason = mismatch_reason(error)
        if reason is None:
            raise
        raise mismatch_error(reason) from None


def load_merged(adapter: Path, base_source: str):
    """The base in fp32 with the adapter merged in: one rounding to the saved dtype, after the merge."""
    base = Phi3VForCausalLM.from_pretrained(base_source, dtype=torch.float32, use_safetensors=True)
    model = with_adapter(base, adapter, lambda reason: ExportError(
        f"the adapter {adapter} does not fit the base {base_source} ({reason}); pass --base with the checkpoint the "
        "adapter was trained on"
    ))
    return model.merge_and_unload(progressbar=True)
