"""Writing files so that a crash never leaves half of one, with the modes the umask asks for; reading the JSON
an option names."""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zipfile
from enum import Enum
from pathlib import Path


def plain(value):
    """`value` as JSON: enums by their value, anything else JSON cannot hold by its text."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def replace_atomically(path: Path, write) -> None:
    """`write(temporary_path)`, then rename over `path`: a crash mid-write leaves the old file whole. The file
    gets the mode the umask gives new files (a temporary file would keep its private 0600)."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        follow_umask(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, payload) -> None:
    """`payload` as indented JSON in `path`, synced before the rename: a reader (or a resumed run) never sees a
    half-written file, even if the job dies mid-write."""
    def write(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())

    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, write)


def json_object(flag: str, value) -> dict:
    """The JSON object an option gives as a dict, inline (text starting with ``{``) or as a JSON file's path:
    how --fsdp_config and --accelerator_config are given. Anything else is a ValueError naming `flag`."""
    if isinstance(value, (str, Path)):
        text = str(value)
        try:
            value = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"{flag} {text}: not readable JSON ({error}); give a JSON file or an inline {{...}}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


def follow_umask(*paths: Path) -> None:
    """Give files the mode the process umask gives new files. safetensors and temporary files are written
    0600, which would hide a shared cluster's weights and results from the rest of a group."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


def follow_umask_in(folder: Path) -> None:
    follow_umask(*(path for path in folder.glob("*.safetensors") if path.is_file()))


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing, unreadable or cut short."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def whole_file(path: Path) -> bool:
    """Present and not cut short: a safetensors file as long as its header says, a torch file with its zip
    directory (written last), JSON that parses. Used for checkpoints that carry no manifest."""
    if not path.is_file():
        return False
    try:
        if path.suffix == ".safetensors":
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            return path.stat().st_size >= 8 + length + max(ends, default=0)
        if path.suffix in (".pt", ".pth", ".bin"):
            return zipfile.is_zipfile(path)
        if path.suffix == ".json":
            return read_json(path) is not None
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False
    return True
