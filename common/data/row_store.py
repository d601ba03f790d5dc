"""Parsed conversations kept in one file and read by offset, so that a restart opens them instead of reading the
data file again, and so that a large dataset costs a few bytes of Python memory per row.

A `RowStore` holds each conversation (``{"id", "images", "messages", ...}``) as one line of compact JSON in a
single buffer, with the line offsets in a numpy array, and, for the warnings of `common.data.formats`, three
64-bit hashes per row (`RowSummaries`). Image paths under the image root are kept relative to it and joined
back when a row is read, so the stored bytes, and the `fingerprint` hashed from them, stay the same when the
data and its images move together to another disk.

Saved (`save`) into a folder of the run folder (``rows.jsonl``, ``offsets.npy``, ``summaries.npy``,
``store.json``), a store is opened (`open`) memory-mapped: the pages are the operating system's page cache, shared
by the ranks of a node and their DataLoader workers, and nothing is read until a row is. ``store.json`` is written
last and names the key the rows were read under; a folder without it, or with another key, is not used.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import mmap
import os
import shutil
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .conversation import split_system

logger = logging.getLogger(__name__)

STORE_VERSION = 1
ROWS_FILE, OFFSETS_FILE, SUMMARIES_FILE, META_FILE = "rows.jsonl", "offsets.npy", "summaries.npy", "store.json"


def hash64(text: str) -> int:
    """A 64-bit hash of `text`, never 0 (0 stands for "none" in `RowSummaries`)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") or 1


def first_exchange(messages: list[dict]) -> tuple[str, str]:
    """(the first question, the first answer stripped, "" when there is none), the system turn left out."""
    _, turns = split_system(messages)
    question = turns[0]["content"] if turns else ""
    answer = turns[1]["content"].strip() if len(turns) > 1 else ""
    return question, answer


def summary_hashes(row_id, images, question: str, answer: str) -> tuple[int, int, int]:
    """The three hashes of `RowSummaries` for one row."""
    return (hash64(json.dumps(row_id, default=str)) if row_id is not None else 0, hash64(json.dumps([list(images), question], default=str)),
            hash64(answer) if answer else 0)


@dataclass
class RowSummaries:
    """What the data warnings compare, per row, as 64-bit hashes: the id (0: none), the images with the first
    question, and the first answer (0: empty). `describe(position)` gives one row's (id, first answer) back."""

    ids: np.ndarray
    inputs: np.ndarray
    answers: np.ndarray
    describe: Callable[[int], tuple[object, str]]

    @classmethod
    def of(cls, summaries: Iterable[tuple[object, tuple, str, str]]) -> "RowSummaries":
        """From (id, image keys, first question, first answer) per row."""
        table = list(summaries)
        hashed = np.array([summary_hashes(*summary) for summary in table], dtype=np.uint64).reshape(-1, 3)
        return cls(hashed[:, 0], hashed[:, 1], hashed[:, 2], lambda position: (table[position][0], table[position][3]))

    def __len__(self) -> int:
        return len(self.ids)


def _relative_images(row: dict, prefix: str) -> dict:
    images = row.get("images")
    if not images:
        return row
    return {**row, "images": [image[len(prefix):] if isinstance(image, str) and image.startswith(prefix) else image for image in images]}


class RowStore:
    """Conversations read by index from a JSON-lines buffer (see the module's docstring); `select` makes a view of
    some rows that shares the buffer. Rows come back as new dicts, with image paths joined to `root`."""

    def __init__(self, buffer, offsets: np.ndarray, summaries: np.ndarray, root: str, fingerprint: str,
                 indices: np.ndarray | None = None, folder: Path | None = None):
        self._buffer, self._offsets, self._summaries = buffer, offsets, summaries
        self.root = root
        self._prefix = os.path.join(root, "")
        self._content = fingerprint
        self._indices = indices
        # Where a saved store lives: a DataLoader worker started by spawn opens it again there.
        self._folder = folder

    # Building, saving, opening ---------------------------------------------------------------------------------

    @classmethod
    def build(cls, rows: Iterable[dict], root: str) -> "RowStore":
        """A store of `rows` (read one at a time; only their bytes are kept) in memory; image paths under `root`
        are stored relative to it."""
        prefix = os.path.join(root, "")
        buffer, offsets, hashes = io.BytesIO(), array("q", [0]), array("Q")
        for row in rows:
            stored = _relative_images(row, prefix)
            line = json.dumps(stored, sort_keys=True, separators=(",", ":")).encode() + b"\n"
            buffer.write(line)
            offsets.append(offsets[-1] + len(line))
            hashes.extend(summary_hashes(stored.get("id"), map(str, stored.get("images") or ()), *first_exchange(stored["messages"])))
        data = buffer.getvalue()
        summaries = np.frombuffer(hashes, dtype=np.uint64).reshape(-1, 3) if hashes else np.zeros((0, 3), dtype=np.uint64)
        return cls(data, np.frombuffer(offsets, dtype=np.int64), summaries, root, hashlib.sha256(data).hexdigest()[:32])

    @classmethod
    def joined(cls, stores: list["RowStore"], drop=()) -> "RowStore":
        """One store (in memory) of the rows of `stores` (whole stores with one root), in order, but for the
        positions in `drop`: the bytes, and so the fingerprint, that one `build` over those rows gives."""
        buffer = b"".join(bytes(store._buffer) for store in stores)
        starts = np.cumsum([0] + [len(store._buffer) for store in stores[:-1]])
        offsets = np.concatenate([store._offsets[:-1] + start for store, start in zip(stores, starts)] + [np.array([len(buffer)])])
        summaries = np.concatenate([np.asarray(store._summaries) for store in stores]).reshape(-1, 3)
        if len(drop):
            keep = np.ones(len(summaries), dtype=bool)
            keep[np.asarray(drop, dtype=np.int64)] = False
            kept = np.flatnonzero(keep).tolist()
            buffer = b"".join(buffer[offsets[k] : offsets[k + 1]] for k in kept)
            offsets = np.concatenate([[0], np.cumsum(np.diff(offsets)[kept])])
            summaries = summaries[kept]
        return cls(buffer, offsets.astype(np.int64), summaries, stores[0].root, hashlib.sha256(buffer).hexdigest()[:32])

    def save(self, folder: Path, meta: dict) -> None:
        """Write the whole store (not a view) into `folder`, replacing what is there; `meta` (the key the rows were
        read under, ...) goes into ``store.json``, written last."""
        if self._indices is not None:
            raise ValueError("RowStore.save: save the whole store, not a view of it")
        folder = Path(folder)
        temporary = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        try:
            (temporary / ROWS_FILE).write_bytes(self._buffer)
            np.save(temporary / OFFSETS_FILE, self._offsets)
            np.save(temporary / SUMMARIES_FILE, self._summaries)
            record = {"version": STORE_VERSION, "rows": len(self), "root": self.root, "fingerprint": self._content, **meta}
            (temporary / META_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(temporary, folder)
        except OSError:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    @classmethod
    def open(cls, folder: Path, key: str) -> tuple["RowStore", dict] | None:
        """(the store saved in `folder` under `key`, its ``store.json``), or None: none there, another key, or
        files that do not hold what ``store.json`` says (then with a warning)."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as error:
            logger.warning("ignoring %s, which cannot be read (%s)", folder / META_FILE, error)
            return None
        if not isinstance(meta, dict) or meta.get("version") != STORE_VERSION or meta.get("key") != key:
            logger.info("%s holds rows read from another version of the data file or under other options; reading the file again", folder)
            return None
        try:
            offsets = np.load(folder / OFFSETS_FILE, mmap_mode="r")
            summaries = np.load(folder / SUMMARIES_FILE, mmap_mode="r")
            with open(folder / ROWS_FILE, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            rows = meta["rows"]
            if offsets.shape != (rows + 1,) or summaries.shape != (rows, 3) or int(offsets[-1]) != size:
                raise ValueError(f"{rows} rows in store.json, {len(offsets) - 1} offsets, {len(summaries)} summaries, {size} bytes")
        except (OSError, ValueError, KeyError) as error:
            logger.warning("ignoring the stored rows in %s, which do not match store.json (%s)", folder, error)
            return None
        return cls(buffer, offsets, summaries, meta["root"], meta["fingerprint"], folder=folder), meta

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._folder is not None:
            # An mmap does not pickle; the worker maps the same files.
            state.update(_buffer=None, _offsets=None, _summaries=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._buffer is None:
            with open(self._folder / ROWS_FILE, "rb") as handle:
                self._buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._offsets = np.load(self._folder / OFFSETS_FILE, mmap_mode="r")
            self._summaries = np.load(self._folder / SUMMARIES_FILE, mmap_mode="r")

    # Reading ---------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._offsets) - 1 if self._indices is None else len(self._indices)

    def _row_number(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        index %= len(self)
        return index if self._indices is None else int(self._indices[index])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.select(range(len(self))[index])
        number = self._row_number(index)
        row = json.loads(self._buffer[int(self._offsets[number]) : int(self._offsets[number + 1]) - 1])
        if row.get("images"):
            row["images"] = [image if os.path.isabs(image) else self._prefix + image for image in row["images"]]
        return row

    def __iter__(self) -> Iterator[dict]:
        return (self[index] for index in range(len(self)))

    def select(self, indices) -> "RowStore":
        """A view of the rows at `indices` (positions in this store or view)."""
        positions = np.asarray(indices, dtype=np.int64)
        rows = positions if self._indices is None else self._indices[positions]
        return RowStore(self._buffer, self._offsets, self._summaries, self.root, self._content, rows, self._folder)

    @property
    def _fingerprint(self) -> str:
        """The rows' identity, as a `datasets.Dataset` has one (`common.data.dataset.data_fingerprint` uses it):
        the stored bytes, and which of them a view takes."""
        if self._indices is None:
            return self._content
        return hashlib.sha256(self._content.encode() + np.ascontiguousarray(self._indices, dtype="<i8").tobytes()).hexdigest()[:32]

    def summaries(self) -> RowSummaries:
        table = self._summaries if self._indices is None else self._summaries[self._indices]

        def describe(position: int) -> tuple[object, str]:
            row = self[position]
            return row.get("id"), first_exchange(row["messages"])[1]

        return RowSummaries(np.asarray(table[:, 0]), np.asarray(table[:, 1]), np.asarray(table[:, 2]), describe)


__all__ = ["RowStore", "RowSummaries", "first_exchange", "hash64", "summary_hashes"]
