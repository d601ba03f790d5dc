"""The export command, `python -m common.export`: a LoRA run merged into its base, or a full run's checkpoint, as a
final model folder in the official checkpoint's format (`common.model.official_format`).

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
from safetensors import SafetensorError

from ..dtypes import SAVE_DTYPES, dtype_name
from ..errors import ExportError, error_reason
from ..io import whole_file
from ..model.modeling_phi3v import Phi3VForCausalLM
from ..model.official_files import base_checkpoint, warn_if_code_is_missing
from ..model.official_format import load_merged, write_final_model
from ..model.processing_phi3v import Phi3VProcessor

logger = logging.getLogger(__name__)


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
