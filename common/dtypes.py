"""The weight dtypes a model folder may be saved in, by the names config.json and the command lines use."""

from __future__ import annotations

import torch

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
