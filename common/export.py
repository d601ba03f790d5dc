"""Outputs in the official checkpoint's format, and the export command.

Every folder a run writes that holds a model (the final model, ``checkpoint-N``, ``OUTPUT_DIR/merged``) is laid
out like ``microsoft/Phi-3.5-vision-instruct`` and holds everything needed to load it without the hub. What makes
it so:

- config.json in the published keys and forms (`Phi3VConfig.official_dict`) plus the base's ``auto_map``, and
  the base's name and commit (``_name_or_path``, ``_revision``) when it came from the hub;
- generation_config.json stopping at every id the evaluation stops at (`stop_token_ids`);
- tokenizer and processor files in the 4.x form (`Phi3VProcessor.save_pretrained` writes them with
  `common.official_files.write_processor_files`), with the ``num_crops`` the run trained with;
- the checkpoint's own code, copied unchanged: a local base folder's ``.py`` files, or those of the hub base's
  commit, fetched into the hub cache when the run starts (`base_checkpoint`). ``auto_map`` entries stay local
  (``module.Class``) and only name modules the folder holds; we never write or ship that code ourselves;
- the base's full set of weight names: the unused last CLIP layer and ``post_layernorm``, which our model does
  not build, are copied from the base (`unused_base_tensors`). Final models (`finalize_weights`) are written in
  the base checkpoint's dtype (or ``--save_dtype``); checkpoints for resume keep the training precision.

Export a LoRA run (merged into its base) or a full run as such a folder::

    python -m common.export --adapter ./output/docvqa-lora --out ./export/docvqa-lora-merged
    python -m common.export --model ./output/docvqa-full/checkpoint-400 --out ./export/docvqa-step400 --save_dtype bfloat16

``--base`` overrides the base named in the adapter's adapter_config.json (or, for ``--model``, where the
code files and ``auto_map`` come from: by default the model folder itself). The output folder must not exist
unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import errno
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .official_files import (
    SAFE_INDEX,
    SAFE_WEIGHTS,
    BaseCheckpoint,
    base_checkpoint,
    copy_code_files,
    warn_if_code_is_missing,
    write_json,
)
from .dtypes import SAVE_DTYPES, dtype_name
from .errors import ExportError, error_reason
from .io import follow_umask_in, replace_atomically, whole_file
from .modeling_phi3v import Phi3VForCausalLM
from .processing_phi3v import Phi3VProcessor, stop_token_ids

logger = logging.getLogger(__name__)

TOWER_PREFIX = "model.vision_embed_tokens.img_processor.vision_model."


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


def unused_base_tensors(base: BaseCheckpoint, present: set[str]) -> dict[str, torch.Tensor]:
    """The base's vision-tower tensors our model does not build (the CLIP layer after the feature layer and
    ``post_layernorm``). They never affect the output and never train; copying them makes the output's weight
    names the base's, so the checkpoint's own code and loaders that check names strictly load it as the base."""
    tensors = {}
    for path in base.weight_files():
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if name.startswith(TOWER_PREFIX) and name not in present:
                    tensors[name] = handle.get_tensor(name)
    return tensors


def with_unused_base_tensors(state_dict: dict[str, torch.Tensor], base_source: str | os.PathLike | BaseCheckpoint) -> dict[str, torch.Tensor]:
    """A model's state dict plus the base's unused tower tensors (`unused_base_tensors`), in the dtype of the
    tower's other weights: what the project's own save writes into every checkpoint-N, whatever the engine."""
    extra = unused_base_tensors(base_checkpoint(base_source), set(state_dict))
    tower = next((t for name, t in state_dict.items() if name.startswith(TOWER_PREFIX) and t.is_floating_point()), None)
    if tower is not None:
        extra = {name: t.to(tower.dtype) for name, t in extra.items()}
    return {**state_dict, **extra}


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


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and processor files
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# python -m common.export
# ----------------------------------------------------------------------------------------------------------


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (``owner/name``): absolute, starting with ``.`` or ``~``, or deeper."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def adapter_base(adapter: Path, base: str | None, remedy: str = "pass --base with the checkpoint the adapter was trained on") -> str:
    """--base, else the base named in the adapter's config; an error saying what to do (`remedy`) if neither loads."""
    if base:
        return base
    config_path = adapter / "adapter_config.json"
    named = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not named:
        raise ExportError(f"{config_path} names no base model; {remedy}")
    if not Path(named).is_dir() and looks_like_path(named):
        raise ExportError(f"{config_path}: the base model {named} does not exist; {remedy} (a folder or a hub id)")
    return named


def check_weight_files(folder: Path) -> None:
    """Every safetensors file of a local model or adapter folder is whole, before anything loads."""
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.safetensors")):
        if not whole_file(path):
            raise ExportError(f"{path} is cut short or damaged (its length or header does not match what it holds); copy it again")


def mismatch_reason(error: RuntimeError) -> str | None:
    """The first "size mismatch" line of a state-dict load, or None for any other error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip().startswith("size mismatch")]
    return lines[0] if lines else None


def write_failure(target: Path, error: BaseException) -> str:
    """Why writing `target` failed, with the free space where it was written."""
    full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or "os error 28" in str(error)
    reason = "no space left on the device" if full else error_reason(error)
    try:
        free = f"{shutil.disk_usage(target.parent).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    return f"could not write {target}: {reason} ({free})"


def check_input_folder(path: Path, what: str, marker: str) -> None:
    if not path.is_dir():
        raise ExportError(f"{what} {path} does not exist or is not a folder")
    if not (path / marker).is_file():
        raise ExportError(f"{what} {path} has no {marker}; pass the folder a run wrote ({marker} is in it)")


def prepare_output(out: Path, overwrite: bool, inputs: list[Path]) -> Path:
    """A fresh temporary folder next to `out`, renamed onto it once complete."""
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another --out, or pass --overwrite to replace it")
    for source in inputs:
        if source.exists() and out.resolve() in (source.resolve(), *source.resolve().parents):
            raise ExportError(f"--out {out} would replace the input {source}; choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in sorted(out.parent.glob(f".{glob.escape(out.name)}.*.partial")):
        if stale.is_dir():
            logger.warning("removing %s, left by an export to %s that was stopped before it finished", stale, out)
            shutil.rmtree(stale)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))


def follow_umask_folder(folder: Path) -> None:
    """A folder made by mkdtemp (0700) gets the mode the umask gives new folders."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)


def load_merged(adapter: Path, base_source: str):
    """The base in fp32 with the adapter merged in: one rounding to the saved dtype, after the merge."""
    from peft import PeftModel

    base = Phi3VForCausalLM.from_pretrained(base_source, dtype=torch.float32, use_safetensors=True)
    try:
        model = PeftModel.from_pretrained(base, adapter)
    except RuntimeError as error:
        if mismatch_reason(error) is None:
            raise
        raise ExportError(
            f"the adapter {adapter} does not fit the base {base_source} ({mismatch_reason(error)}); pass --base with "
            "the checkpoint the adapter was trained on"
        ) from None
    return model.merge_and_unload(progressbar=True)


def export(adapter: str | None, model: str | None, out: str, base: str | None, save_dtype: str | None, overwrite: bool) -> Path:
    out_path = Path(out)
    if base and looks_like_path(base) and not Path(base).exists():
        raise ExportError(f"--base {base} does not exist; pass the base checkpoint's folder or hub id")
    if adapter:
        source = Path(adapter)
        check_input_folder(source, "--adapter", "adapter_config.json")
        base_source = adapter_base(source, base)
    else:
        source = Path(model)
        check_input_folder(source, "--model", "config.json")
        base_source = base or str(source)
    for folder in (source, Path(base_source)):
        check_weight_files(folder)
    staging = prepare_output(out_path, overwrite, [source, Path(base_source)])
    warn_if_code_is_missing(base_checkpoint(base_source))
    try:
        try:
            merged = load_merged(source, base_source) if adapter else Phi3VForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
            # The processor the run saved carries its num_crops; the base's would bring its own.
            processor = Phi3VProcessor.from_pretrained(source)
        except (OSError, SafetensorError, HFValidationError) as error:
            raise ExportError(f"could not load {source} (base {base_source}): {error_reason(error)}") from error
        processor.source = base_source
        try:
            dtype = write_final_model(merged, processor, staging, base_source, SAVE_DTYPES.get(save_dtype))
        except (OSError, SafetensorError) as error:
            shutil.rmtree(staging, ignore_errors=True)
            kept = f"{out_path} is unchanged" if out_path.exists() else f"nothing was written under {out_path}"
            raise ExportError(f"{write_failure(out_path, error)}; {kept}; make room and run the export again") from None
        follow_umask_folder(staging)
        if out_path.exists():
            shutil.rmtree(out_path)
        os.replace(staging, out_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported %s (%s weights) to %s", source, dtype_name(dtype), out_path)
    return out_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m common.export", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--adapter", help="a LoRA/QLoRA run's output folder (adapter_config.json): merged into its base")
    what.add_argument("--model", help="a full or frozen-vision run's output or checkpoint-N folder")
    parser.add_argument("--out", required=True, help="folder to write; must not exist unless --overwrite")
    parser.add_argument("--base", help="base checkpoint (folder or hub id); default: the adapter's base, or --model itself")
    parser.add_argument("--save_dtype", choices=sorted(SAVE_DTYPES), help="weights dtype (default: the base's, bf16 for the official one)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        out = export(args.adapter, args.model, args.out, args.base, args.save_dtype, args.overwrite)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
