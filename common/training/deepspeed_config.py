"""The --deepspeed value: a word for no DeepSpeed, or a config (a dict, or a JSON file's path)."""

from __future__ import annotations

import json
from pathlib import Path

# What --deepspeed says to mean "no DeepSpeed" (the full-model default would otherwise apply).
NO_DEEPSPEED = ("none", "None", "")


def deepspeed_config(value) -> dict:
    """The config `value` gives, as a dict: empty for no DeepSpeed (or a path that is not a file, which
    TrainingArguments reports), the dict itself, or the JSON file read."""
    if value is None or value in NO_DEEPSPEED:
        return {}
    if isinstance(value, dict):
        return value
    path = Path(value)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
