"""What the validation pass found, kept in the run folder so that a resume or a restart does not check again.

The pass (`common.data.validation`) records, per row, its token count, its count of supervised tokens and the error
that makes it unusable, if any (`RowScan`). That record is written to ``OUTPUT_DIR/data_scans/`` by the main
process, one JSON file per dataset, under a key (`scan_key`) that covers:

- the data files the rows were read from (the dataset's ``data_files``, a `datasets.Dataset`'s Arrow files):
  size, modification time and the first and last 64 KiB of each;
- the rows themselves (`dataset.data_fingerprint`: every row of an in-memory list, a `datasets.Dataset`'s
  own fingerprint) and how they are converted (the ``to_example`` function and its settings, such as a system
  prompt) with the seed its random draws follow;
- what tokenization depends on: --num_crops, the tokenizer (name, vocabulary, special tokens, chat template,
  its files) and the image processor's settings.

--max_length and --skip_bad_examples are not part of the key: they are applied to the recorded counts each
time. A file whose key differs is checked again and replaced; one that cannot be read or does not hold what
the key says is ignored with a warning. Image files are not fingerprinted (that would stat every one of them):
after changing images in place without changing the data file, delete ``data_scans/``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import plain
from .dataset import data_fingerprint

logger = logging.getLogger(__name__)

# Where in the run folder: --overwrite_output_dir moves it with the run's other outputs (`RUN_OUTPUT_PATTERNS`).
CACHE_FOLDER = "data_scans"
FORMAT_VERSION = 1
EDGE_BYTES = 64 << 10
# The error types a recorded error comes back as.
ERROR_KINDS = ("ExampleError", "LoadingError")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


@dataclass
class RowScan:
    """Per row of a dataset: token count and supervised token count (-1 where the row failed or was not
    scanned), and the errors of the rows that failed, {index: (row id, error type name, message)}. `scanned`
    counts the rows checked from the start: fewer than all when a pass stopped at its first bad row."""

    total: np.ndarray
    supervised: np.ndarray
    errors: dict[int, tuple[object, str, str]] = field(default_factory=dict)
    scanned: int = 0

    @classmethod
    def empty(cls, rows: int) -> "RowScan":
        return cls(np.full(rows, -1, dtype=np.int32), np.full(rows, -1, dtype=np.int32))

    @property
    def complete(self) -> bool:
        return self.scanned == len(self.total)

    @classmethod
    def joined(cls, parts: list["RowScan"]) -> "RowScan":
        """The shards of consecutive rows as one; its rows count as scanned up to the first shard that stopped early."""
        offset, scanned, complete, errors = 0, 0, True, {}
        for part in parts:
            errors.update((offset + index, error) for index, error in part.errors.items())
            offset += len(part.total)
            if complete:
                scanned += part.scanned
                complete = part.complete
        total = np.concatenate([part.total for part in parts])
        return cls(total, np.concatenate([part.supervised for part in parts]), errors, scanned)


def _edges(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(EDGE_BYTES))
        handle.seek(max(0, os.fstat(handle.fileno()).st_size - EDGE_BYTES))
        digest.update(handle.read(EDGE_BYTES))
    return digest.hexdigest()


def file_fingerprint(path) -> dict:
    """A data file's size, modification time and a hash of its first and last 64 KiB."""
    path = Path(path)
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "edges": _edges(path)}


def data_files(dataset) -> list[str]:
    """The files `dataset`'s rows come from: those it names, and the Arrow files of a `datasets.Dataset`."""
    files = list(getattr(dataset, "data_files", []))
    files += [entry["filename"] for entry in getattr(getattr(dataset, "source", None), "cache_files", None) or []]
    return files


def converter_identity(to_example) -> object:
    """The row conversion: a function's qualified name, a callable object's class and settings."""
    if to_example is None:
        return None
    if hasattr(to_example, "func"):
        return {"partial": converter_identity(to_example.func), "args": plain(to_example.args), "keywords": plain(to_example.keywords)}
    name = getattr(to_example, "__qualname__", None) or type(to_example).__qualname__
    settings = vars(to_example) if not hasattr(to_example, "__code__") and hasattr(to_example, "__dict__") else {}
    return {"name": name, "settings": plain(settings)}


def processor_identity(processor) -> dict:
    """What a token count depends on in the processor: the tokenizer and its files, the image settings."""
    tokenizer = processor.tokenizer
    folder = Path(str(tokenizer.name_or_path))
    files = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in TOKENIZER_FILES if (folder / name).is_file()}
    return {
        "tokenizer": str(tokenizer.name_or_path),
        "vocabulary": len(tokenizer),
        "special_tokens": plain(tokenizer.all_special_tokens),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "files": files,
        "image_processor": plain(processor.image_processor.to_dict()),
    }


def scan_key(dataset, processor, content: str | None = None) -> str:
    """The fingerprint a recorded scan of `dataset` must carry to be used (see the module's docstring);
    `content`: the rows' `data_fingerprint` when it is known already (it reads every row)."""
    identity = {
        "version": FORMAT_VERSION,
        "dataset": dataset.name,
        "rows": len(dataset),
        "for_training": dataset.for_training,
        "files": [file_fingerprint(path) for path in data_files(dataset)],
        "content": content or data_fingerprint(dataset),
        "conversion": converter_identity(dataset.to_example),
        # Random draws in the conversion follow the seed (`RecipeDataset`).
        "seed": getattr(dataset, "seed", None),
        "num_crops": processor.image_processor.num_crops,
        "processor": processor_identity(processor),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _counts(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<i4").tobytes()).decode("ascii")


def _array(text: str, rows: int) -> np.ndarray:
    array = np.frombuffer(base64.b64decode(text, validate=True), dtype="<i4")
    if len(array) != rows:
        raise ValueError(f"{len(array)} counts for {rows} rows")
    return array.astype(np.int32)


class ScanCache:
    """The recorded scans in a run folder, one file per dataset name. `contents`: {id(dataset): its rows'
    `data_fingerprint`} for datasets whose fingerprint the run folder's claim has computed already."""

    def __init__(self, run_folder, contents: dict[int, str] | None = None):
        self.folder = Path(run_folder) / CACHE_FOLDER
        self.contents = contents or {}

    def path(self, name: str) -> Path:
        return self.folder / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.json"

    def load(self, name: str, key: str, rows: int) -> RowScan | None:
        """The complete scan recorded under `key`, or None: no file, another key, or a file not to trust."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or record.get("version") != FORMAT_VERSION:
                raise ValueError("not a scan record of this version")
            if record.get("key") != key:
                logger.info("%s: the data or the tokenization changed since %s was written; checking the rows again", name, path)
                return None
            if record.get("dataset") != name or record.get("rows") != rows:
                raise ValueError("it names another dataset or row count")
            errors = {}
            for entry in record["errors"]:
                index, kind, reason = entry["index"], entry["kind"], entry["reason"]
                if not (isinstance(index, int) and 0 <= index < rows and kind in ERROR_KINDS and isinstance(reason, str)):
                    raise ValueError(f"bad error entry {entry!r:.100}")
                errors[index] = (entry.get("id"), kind, reason)
            scan = RowScan(_array(record["total"], rows), _array(record["supervised"], rows), errors, rows)
            failed = scan.total < 0
            if set(np.flatnonzero(failed).tolist()) != set(errors):
                raise ValueError("its failed rows and its errors disagree")
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("%s: ignoring %s, which cannot be used (%s); checking the rows again", name, path, error)
            return None
        return scan

    def save(self, name: str, key: str, scan: RowScan) -> None:
        """Record a complete scan; written whole or not at all (a temporary file renamed over the old one)."""
        record = {
            "version": FORMAT_VERSION,
            "key": key,
            "dataset": name,
            "rows": len(scan.total),
            "total": _counts(scan.total),
            "supervised": _counts(scan.supervised),
            "errors": [{"index": index, "id": plain(row_id), "kind": kind, "reason": reason} for index, (row_id, kind, reason) in sorted(scan.errors.items())],
        }
        path = self.path(name)
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(record) + "\n", encoding="utf-8")
            os.replace(temporary, path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            logger.warning("%s: could not record the validation results in %s (%s); a restart will check again", name, path, error)


__all__ = ["RowScan", "ScanCache", "scan_key", "file_fingerprint", "data_files"]
