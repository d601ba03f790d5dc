"""Reading a checkpoint's torch files without ever running code from them.

A ``.pt``/``.pth``/``.bin`` file is a pickle, and unpickling can call any function the file names. DeepSpeed
reads its ``global_stepN/*.pt`` with ``torch.load(weights_only=False)``, so a crafted checkpoint would run its
code on ``--resume_from_checkpoint``. Before a resume, every torch file of the checkpoint is read with torch's
weights-only unpickler, which builds nothing but tensors, containers and the types below (`ALLOWED_TYPES`: what
the Trainer and DeepSpeed's ZeRO-2/ZeRO-3 checkpoints hold), and the run stops naming the first file that names
anything else. The loads during the resume itself are forced to weights-only with the same list.

``training_args.bin`` is not read: nothing loads it on resume (it pickles the whole argument object).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
NOT_LOADED = ("training_args.bin",)


class UnsafeCheckpointFile(Exception):
    """A checkpoint file that could run code when loaded; the message names it."""


def allowed_types() -> list:
    """What the Trainer's RNG states (numpy arrays) and DeepSpeed's optimizer states hold besides tensors."""
    import numpy

    types = [numpy._core.multiarray._reconstruct, numpy.ndarray, numpy.dtype, type(numpy.dtype(numpy.uint32))]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return types
    return [*types, LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def torch_files(checkpoint: Path) -> list[Path]:
    return sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.suffix in TORCH_SUFFIXES and p.name not in NOT_LOADED)


def check_torch_file(path: Path) -> None:
    """Unpickle `path` weights-only (tensor data memory-mapped, not read); raise naming it if it holds more."""
    try:
        with torch.serialization.safe_globals(allowed_types()):
            # weights_only passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn it off.
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"it names {named.group(1)}" if named else "it is not a weights-only file"
        raise UnsafeCheckpointFile(
            f"{path}: refused to load, {what}, which is neither a tensor nor a type DeepSpeed or the Trainer store, and "
            "unpickling it could run code; delete that checkpoint, or resume another one with --resume_from_checkpoint PATH"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise UnsafeCheckpointFile(
            f"{path}: not a readable torch file ({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
            "resume another checkpoint with --resume_from_checkpoint PATH"
        ) from None


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside, DeepSpeed's included, is weights-only with `allowed_types`."""
    saved = {name: os.environ.get(name) for name in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        with torch.serialization.safe_globals(allowed_types()):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


__all__ = ["UnsafeCheckpointFile", "check_torch_file", "torch_files", "weights_only_loads"]
