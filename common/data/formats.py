"""Conversation data in the formats people already have, read into the examples of `common/data/conversation.py`.

Used by `finetune_hf_trainer_custom.py` and `common.outputs.predict --jsonl`. Files, as a JSON array or JSONL:

- ``llava``: ``{"id", "image": str | [str], "conversations": [{"from": "system"|"human"|"gpt", "value"}]}``. Each
  ``<image>`` placeholder becomes ``<|image_k|>`` where it stands (k counts the images in order); without any,
  the tags go in front of the first question, each followed by a newline. A count of placeholders different
  from the images is an error. A row-level ``"system"`` string is the system turn when the row has none.
- ``messages`` (OpenAI / HF chat): ``{"messages": [{"role": "system"|"user"|"assistant", "content": str |
  [{"type": "text", "text"} | {"type": "image", "image"|"path": str}]}], "images"?: [str]}``. An image part
  without a path, or an ``<image>`` in string content, takes the next of the row's ``images``; row images that
  no part or placeholder takes go in front of the first question. An image part becomes its tag and a newline.
- ``jsonl``: this project's own format (`common.data.dataset.load_jsonl_conversations`), read by that function.

Image paths are relative to the image root and checked as for the project's JSONL (no absolute paths, nothing
outside the root, the file exists). Every row is checked when the file is read; a bad row stops with
``file:line`` and what to fix (``--skip_bad_examples`` records it and leaves it out). ``auto`` detects the
format from the first rows and says which it took.

A hub or ``save_to_disk`` dataset holds the conversation in one column (turns in any of the three shapes:
``{"role", "content"}``, ``{"from", "value"}``, or ``{"user", "assistant"}`` as in the Cauldron) and the images
in another (PIL images, or paths relative to the image root); `ColumnConversations` converts its rows lazily.

A conversation is ``{"id", "images", "messages"}`` with an optional system message first; `evaluation_examples`
turns one into the evaluation examples of the chosen assistant turn(s), each with the turns before it as context.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from ..errors import DataError, ExampleError
from ..ranks import from_main, is_main_process, on_main, rank_and_world
from .conversation import check_messages
from .dataset import (
    RecipeDataset,
    _resolve_image,
    jsonl_prediction_examples,
    load_jsonl_conversations,
    resolving_images,
)
from .row_store import RowStore, RowSummaries, first_exchange
from .scan_cache import CACHE_FOLDER, converter_identity, file_fingerprint
from .sources import first_rows, load_split

logger = logging.getLogger(__name__)

FILE_FORMATS = ("llava", "messages", "jsonl")
EVAL_TURNS = ("first", "last", "all")
PLACEHOLDER = "<image>"
PLACEHOLDER_PATTERN = re.compile(re.escape(PLACEHOLDER))
LLAVA_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
CHAT_ROLES = ("system", "user", "assistant")
# Rows read to detect a file's format; they must all agree.
DETECT_ROWS = 5
# Fewer optimizer steps than this rarely move a model; the run is more likely a misconfiguration.
MIN_USEFUL_STEPS = 10
# Part of the key of rows kept by `stored_conversations`: raise it when reading a row gives other conversations.
ROWS_READER_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# Reading rows of a JSON array or JSONL file, with their line numbers
# ----------------------------------------------------------------------------------------------------------


def _is_array(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def file_rows(path: Path, part: tuple[int, int] = (0, 1)) -> Iterator[tuple[str, object]]:
    """(``"path:line"``, the parsed row) for each row of a JSON array file or each non-blank line of a JSONL file.

    `part` (k, n): only the rows that start in the k-th of n equal stretches of the file, so that n processes
    share one file, each row read by one of them. A JSONL part seeks to its stretch; an array's part decodes the
    rows before its stretch too (JSON gives no other way to find where a row starts), but converts none of them.
    """
    if _is_array(path):
        yield from _array_rows(path, part)
        return
    index, count = part
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        position, stop = size * index // count, size * (index + 1) // count
        line_number = 1
        if position:
            # The first line this part reads is the first to start at or after `position`.
            line_number += _newlines_before(handle, position - 1)
            handle.seek(position - 1)
            skipped = handle.readline()
            line_number += skipped.count(b"\n")
            position += len(skipped) - 1
        while position < stop:
            raw = handle.readline()
            if not raw:
                return
            where = f"{path}:{line_number}"
            position += len(raw)
            line_number += 1
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not UTF-8 text ({error}); save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{where}: invalid JSON ({error.msg} at column {error.colno}); each line must be one complete JSON "
                    "object (or make the whole file one JSON array)"
                ) from None


def _newlines_before(handle, offset: int) -> int:
    handle.seek(0)
    count, left = 0, offset
    while left > 0:
        chunk = handle.read(min(left, 16 << 20))
        if not chunk:
            break
        count += chunk.count(b"\n")
        left -= len(chunk)
    return count


def _array_rows(path: Path, part: tuple[int, int] = (0, 1)) -> Iterator[tuple[str, object]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error}); save the file as UTF-8") from None
    index, count = part
    first, stop = len(text) * index // count, len(text) * (index + 1) // count
    decoder = json.JSONDecoder()
    space = re.compile(r"\s*")
    position = space.match(text, text.index("[") + 1).end()
    line, counted = 1, 0

    def line_at(offset: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, offset)
        counted = offset
        return line

    if text[position : position + 1] == "]":
        return
    while position < stop:
        try:
            row, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
        if position >= first:
            yield f"{path}:{line_at(position)}", row
        position = space.match(text, end).end()
        separator = text[position : position + 1]
        position = space.match(text, position + 1).end()
        if separator == "]":
            if position != len(text):
                raise DataError(f"{path}:{line_at(position)}: text after the end of the JSON array; remove it")
            return
        if separator != ",":
            raise DataError(f"{path}:{line_at(min(position, len(text)))}: expected ',' or ']' between the rows of the JSON array")


def row_format(row) -> str | None:
    """The file format a row is written in, None if it is none of them."""
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("messages"), list):
        return "messages"
    turns = row.get("conversations")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict):
        if "from" in turns[0] or "value" in turns[0]:
            return "llava"
        if "user" in turns[0] or "assistant" in turns[0]:
            return "jsonl"
    return None


def detect_format(path: Path) -> str:
    """The format of a data file, from its first rows; a file they do not identify is an error naming the row."""
    seen: dict[str, str] = {}
    for count, (where, row) in enumerate(file_rows(path)):
        found = row_format(row)
        if found is None:
            raise DataError(
                f"{where}: the row is in none of the formats read here: LLaVA ({{\"image\", \"conversations\": [{{\"from\", "
                "\"value\"}]}), messages ({\"messages\": [{\"role\", \"content\"}]}) or this project's JSONL "
                "({\"id\", \"conversations\": [{\"user\", \"assistant\"}]}); convert it, or pass --format to get that format's errors"
            )
        seen.setdefault(found, where)
        if len(seen) > 1:
            first, second = list(seen.items())
            raise DataError(f"{path}: rows are in different formats ({first[0]} at {first[1]}, {second[0]} at {second[1]}); keep one format per file")
        if count + 1 == DETECT_ROWS:
            break
    if not seen:
        raise DataError(f"{path} holds no examples (no row); write one conversation per line or a JSON array of them")
    if "jsonl" in seen and _is_array(path):
        raise DataError(f"{path}: this project's format is JSONL, one object per line, not a JSON array; write one row per line")
    return next(iter(seen))


# ----------------------------------------------------------------------------------------------------------
# One row's turns and images -> messages with image tags
# ----------------------------------------------------------------------------------------------------------


def _tag(number: int) -> str:
    return f"<|image_{number}|>"


def _string(value, what: str) -> str:
    if not isinstance(value, str):
        raise ExampleError(f"{what} must be a string, got {value!r:.100}")
    return value


def chat_messages(turns, row_images: list, resolve) -> tuple[list[dict], list]:
    """Messages and images of ``{"role", "content"}`` turns whose content may be a list of parts.

    `row_images`: the images no part names, taken in order by image parts without a path and by ``<image>``
    placeholders. `resolve(path, what)` turns a path a part names into the image to use.
    """
    if not isinstance(turns, list) or not turns:
        raise ExampleError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    images: list = []
    pending = list(row_images)

    def take(what: str):
        if not pending:
            raise ExampleError(f"{what} asks for an image, but the row's \"images\" has no more ({len(row_images)} given)")
        images.append(pending.pop(0))
        return _tag(len(images))

    messages = []
    for index, turn in enumerate(turns):
        what = f"messages[{index}]"
        if not isinstance(turn, dict) or turn.get("role") not in CHAT_ROLES:
            raise ExampleError(f"{what} must be an object with \"role\" one of {list(CHAT_ROLES)} and \"content\", got {turn!r:.100}")
        content = turn.get("content")
        if isinstance(content, str):
            text = PLACEHOLDER_PATTERN.sub(lambda _: take(f"{what}: an {PLACEHOLDER} placeholder"), content)
        elif isinstance(content, list):
            pieces: list[tuple[str, bool]] = []
            for part_index, part in enumerate(content):
                part_what = f"{what}.content[{part_index}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    pieces.append((_string(part.get("text"), f"{part_what}.text"), False))
                elif kind == "image":
                    path = part.get("image", part.get("path"))
                    if path is None:
                        pieces.append((take(part_what), True))
                    else:
                        images.append(resolve(path, part_what))
                        pieces.append((_tag(len(images)), True))
                else:
                    raise ExampleError(f"{part_what} must be {{\"type\": \"text\", \"text\"}} or {{\"type\": \"image\", \"image\" | \"path\"}}, got {part!r:.100}")
            # An image tag is followed by a newline, as in the Phi-3.5-vision prompts, unless it ends the message.
            text = "".join(piece + ("\n" if is_image and position < len(pieces) - 1 else "") for position, (piece, is_image) in enumerate(pieces))
        else:
            raise ExampleError(f"{what}.content must be a string or a list of parts, got {content!r:.100}")
        messages.append({"role": turn["role"], "content": text})
    if pending:
        if images:
            raise ExampleError(f"the row has {len(row_images)} \"images\" but its parts and {PLACEHOLDER} placeholders take {len(row_images) - len(pending)}; give every image its place, or none")
        messages = _images_in_front(messages, len(pending))
        images = pending
    return messages, images


def placed_images(messages: list[dict], images: list) -> list[dict]:
    """The messages with each ``<image>`` placeholder replaced by the next image's tag, or with all tags in front
    of the first question when there is no placeholder."""
    placeholders = sum(message["content"].count(PLACEHOLDER) for message in messages)
    if not placeholders:
        return _images_in_front(messages, len(images))
    if placeholders != len(images):
        raise ExampleError(
            f"{placeholders} {PLACEHOLDER} placeholder(s) but {len(images)} image(s); give one {PLACEHOLDER} per image, in "
            "order, or none (the images then go in front of the first question)"
        )
    numbers = iter(range(1, len(images) + 1))
    return [{**message, "content": PLACEHOLDER_PATTERN.sub(lambda _: _tag(next(numbers)), message["content"])} for message in messages]


def _images_in_front(messages: list[dict], count: int) -> list[dict]:
    if not count:
        return messages
    first_user = next((i for i, message in enumerate(messages) if message["role"] == "user"), None)
    if first_user is None:
        raise ExampleError("the conversation has images but no user message to put them in")
    messages = list(messages)
    tags = "".join(_tag(k) for k in range(1, count + 1))
    messages[first_user] = {**messages[first_user], "content": f"{tags}\n{messages[first_user]['content']}"}
    return messages


def llava_messages(turns) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ExampleError("\"conversations\" must be a non-empty list of {\"from\", \"value\"} turns")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in LLAVA_ROLES:
            raise ExampleError(f"conversations[{index}] must have \"from\" one of {sorted(LLAVA_ROLES)}, got {turn!r:.100}")
        messages.append({"role": LLAVA_ROLES[turn["from"]], "content": _string(turn.get("value"), f"conversations[{index}].value")})
    return messages


def pair_messages(turns) -> list[dict]:
    """``[{"user", "assistant"}]`` turns (the Cauldron's ``texts``, this project's JSONL) as messages."""
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or "user" not in turn:
            raise ExampleError(f"turn {index} must have \"user\" and \"assistant\" strings, got {turn!r:.100}")
        messages.append({"role": "user", "content": _string(turn["user"], f"turn {index}.user")})
        if "assistant" in turn:
            messages.append({"role": "assistant", "content": _string(turn["assistant"], f"turn {index}.assistant")})
    return messages


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The messages with `system_prompt` as their system message, unless they have one."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _as_list(images) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _checked(messages: list[dict], images: list, answered: bool) -> dict:
    if not answered and messages and messages[-1]["role"] == "assistant":
        check_messages(messages, len(images), for_training=True)
    else:
        check_messages(messages, len(images), for_training=answered)
    return {"images": images, "messages": messages}


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def read_conversations(path, image_root, file_format: str = "auto", system_prompt: str | None = None, skip_log=None, answered: bool = True) -> tuple[list[dict], str]:
    """(the conversations of a data file, its format). ``answered=False`` (prediction) also takes conversations
    that end with a user message, and this project's JSONL rows without answers."""
    conversations, file_format = conversations_of(path, image_root, file_format, system_prompt, skip_log, answered)
    return list(conversations), file_format


def conversations_of(path, image_root, file_format: str = "auto", system_prompt: str | None = None, skip_log=None,
                     answered: bool = True) -> tuple[Iterator[dict], str]:
    """`read_conversations` one row at a time: (the conversations, read as they are taken, the file's format).
    The file, the image root and the format are checked before this returns."""
    path, root = Path(path), Path(image_root)
    file_format = checked_format(path, root, file_format)
    if file_format == "jsonl":
        rows = load_jsonl_conversations(path, root, skip_log) if answered else jsonl_prediction_examples(path, root)
        return ({**row, "messages": with_system(row["messages"], system_prompt)} for row in rows), file_format

    def failed(where: str, error: Exception) -> None:
        skip_log.record(str(error), stage="validation")

    rows = _file_conversations(path, root.resolve(), file_format, system_prompt, failed if skip_log is not None else None, answered)
    return _at_least_one((conversation for _, conversation in rows), path), file_format


def checked_format(path: Path, root: Path, file_format: str) -> str:
    """The format to read `path` in (`file_format`, or the one its first rows show for "auto"), once the file and
    the image root are checked to exist."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist or is not a file")
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} is not a folder; pass --image_root, the folder that {path.name}'s image paths are relative to")
    if file_format == "auto":
        file_format = detect_format(path)
        logger.info("%s: read as %s (detected from its first rows; --format sets it)", path, file_format)
    return file_format


def _file_conversations(path: Path, root: Path, file_format: str, system_prompt: str | None, failed, answered: bool = True,
                        part: tuple[int, int] = (0, 1)) -> Iterator[tuple[str, dict]]:
    """(where, conversation) for each row of `part` (`file_rows`) of a LLaVA or messages file. A row that is not a
    conversation, or whose id a row before it in the part has, is handed to `failed(where, error)` and left out;
    without `failed` it raises."""
    line_of_id = {}
    with resolving_images():
        for where, row in file_rows(path, part):
            try:
                conversation = file_conversation(row, file_format, root, path.name, where, answered)
                if conversation["id"] in line_of_id:
                    raise DataError(f"{where}: id {conversation['id']!r} is already used at {line_of_id[conversation['id']]}; give every row its own id")
            except (DataError, FileNotFoundError) as error:
                if failed is None:
                    raise
                failed(where, error)
                continue
            line_of_id[conversation["id"]] = where
            conversation["messages"] = with_system(conversation["messages"], system_prompt)
            yield where, conversation


def _at_least_one(rows: Iterator[dict], path: Path) -> Iterator[dict]:
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise DataError(f"{path} holds no usable examples")


# ----------------------------------------------------------------------------------------------------------
# Rows kept in the run folder, read by all ranks together
# ----------------------------------------------------------------------------------------------------------


@dataclass
class FilePart:
    """What one rank read of its part of a data file (`file_rows`): the conversations as a `RowStore`, the line of
    each, the bad rows [(line, error)], and the error that stopped the reading (the file itself is broken)."""

    rows: RowStore
    lines: np.ndarray
    failures: list[tuple[int, Exception]]
    broken: DataError | None = None


def _line_of(where: str) -> int:
    return int(where.rsplit(":", 1)[1])


def read_part(path: Path, root: Path, file_format: str, system_prompt: str | None, part: tuple[int, int]) -> FilePart:
    """One rank's share of a LLaVA or messages file (`root` resolved), every bad row of it noted, not raised."""
    failures, lines = [], array("q")

    def kept() -> Iterator[dict]:
        rows = _file_conversations(path, root, file_format, system_prompt, lambda where, error: failures.append((_line_of(where), error)), True, part)
        for where, conversation in rows:
            lines.append(_line_of(where))
            yield conversation

    try:
        store = RowStore.build(kept(), str(root))
    except DataError as broken:
        return FilePart(RowStore.build([], str(root)), np.zeros(0, dtype=np.int64), failures, broken)
    return FilePart(store, np.frombuffer(lines, dtype=np.int64), failures)


def joined_parts(parts: list[FilePart], path: Path, skip_log) -> tuple[RowStore, list[str]]:
    """The parts as one store, the same as reading the whole file in one process gives, and the reasons of the
    rows left out. Bad rows go to `skip_log` in the file's order; without one, the first raises, as does a
    broken file after the rows before it."""
    joined = RowStore.joined([part.rows for part in parts])
    lines = np.concatenate([part.lines for part in parts])
    part_of = np.repeat(np.arange(len(parts)), [len(part.rows) for part in parts])
    # Ordered by (part, line): a broken file ends its part.
    failures = [((k, line), error) for k, part in enumerate(parts) for line, error in part.failures]
    failures += [((k, math.inf), part.broken) for k, part in enumerate(parts) if part.broken is not None]
    repeated = _ids_used_before(joined, lines, path)
    failures += [((int(part_of[position]), int(lines[position])), error) for position, error in repeated]
    failures.sort(key=lambda failure: failure[0])
    reasons = []
    for (_, line), error in failures:
        if skip_log is None or line == math.inf:
            raise error
        skip_log.record(str(error), stage="validation")
        reasons.append(str(error))
    if repeated:
        joined = RowStore.joined([joined], drop=[position for position, _ in repeated])
    if not len(joined):
        raise DataError(f"{path} holds no usable examples")
    return joined, reasons


def _ids_used_before(rows: RowStore, lines: np.ndarray, path: Path) -> list[tuple[int, DataError]]:
    """The rows whose id a row before them has, in another part (each part checked its own), with the error."""
    ids = rows.summaries().ids
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    repeated = []
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], len(ids)]):
        if stop - start < 2:
            continue
        first_of: dict = {}
        for position in order[start:stop].tolist():
            row_id = rows[position]["id"]
            if row_id in first_of:
                where = f"{path}:{lines[first_of[row_id]]}"
                repeated.append((position, DataError(f"{path}:{lines[position]}: id {row_id!r} is already used at {where}; give every row its own id")))
            else:
                first_of[row_id] = position
    return repeated


class _KeptSkips:
    """A skip log that also keeps the reasons it is given, for the row store to give them again at a restart."""

    def __init__(self, skip_log):
        self.skip_log, self.reasons = skip_log, []

    def record(self, reason: str, stage: str) -> None:
        self.reasons.append(reason)
        self.skip_log.record(reason, stage)


def rows_key(path: Path, root: Path, file_format: str, system_prompt: str | None) -> str:
    """What stored rows of `path` must have been read under to be used: the file (where it is, its size, its
    modification time, its first and last 64 KiB), the image root and the reading options."""
    identity = {
        "reader": ROWS_READER_VERSION,
        "file": str(path.resolve()),
        "fingerprint": file_fingerprint(path),
        "image_root": str(root.resolve()),
        "format": file_format,
        "system_prompt": system_prompt,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def stored_conversations(path, image_root, file_format: str, system_prompt: str | None, skip_log, run_folder) -> tuple[RowStore, str]:
    """`read_conversations` as a `RowStore`, kept in ``RUN_FOLDER/data_scans/`` for the next start on the same file
    and options (`rows_key`), which opens it instead of reading the file again.

    A LLaVA or messages file is read by all ranks together, each its part (`read_part`); the main process joins
    the parts (`joined_parts`) and saves the store, and the other ranks open what it saved (on a disk that nodes
    do not share, each reads the file itself). This project's JSONL is read by the main process. A bad row's
    error reaches every rank. Rows left out under --skip_bad_examples are recorded in the skip log again at
    each start, as a first start does; without a skip log, the first of them stops the run.
    """
    path, root = Path(path), Path(image_root)
    folder = Path(run_folder) / CACHE_FOLDER / f"rows-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
    rank, world = rank_and_world()

    def on_main_process(work):
        """`work()`'s result on the main process, and its error (or None) on every rank."""
        result = error = None
        if is_main_process():
            try:
                result = work()
            except (DataError, FileNotFoundError) as failure:
                error = failure
        error = from_main(error)
        if error is not None:
            raise error
        return result

    def opened():
        key = rows_key(path, root, file_format, system_prompt) if path.is_file() else None
        stored = RowStore.open(folder, key) if key else None
        if stored is None:
            return key, checked_format(path, root, file_format), None
        logger.info("%s: %d rows opened from %s (read by an earlier start of this run; the file is unchanged)", path, len(stored[0]), folder)
        for reason in stored[1]["skipped"]:
            if skip_log is None:
                raise DataError(reason)
            skip_log.record(reason, stage="validation")
        return key, stored[1]["format"], stored

    def saved(store: RowStore, meta: dict) -> tuple[RowStore, dict]:
        try:
            store.save(folder, meta)
        except OSError as failure:
            logger.warning("%s: could not keep the rows in %s (%s); a restart will read the file again", path, folder, failure)
        return store, meta

    def read_whole() -> tuple[RowStore, dict]:
        if found == "jsonl":
            kept = _KeptSkips(skip_log) if skip_log is not None else None
            conversations = conversations_of(path, root, found, system_prompt, kept)[0]
            return RowStore.build(conversations, str(root.resolve())), {"key": key, "format": found, "skipped": kept.reasons if kept else []}
        store, reasons = joined_parts([read_part(path, root.resolve(), found, system_prompt, (0, 1))], path, skip_log)
        return store, {"key": key, "format": found, "skipped": reasons}

    key, found, stored = on_main_process(opened) or (None, None, None)
    key, found, reused = from_main((key, found, stored is not None))
    if not reused:
        if found == "jsonl" or world == 1:
            stored = on_main_process(lambda: saved(*read_whole()))
        else:
            parts = on_main(read_part(path, root.resolve(), found, system_prompt, (rank, world)))

            def join() -> tuple[RowStore, dict]:
                store, reasons = joined_parts(parts, path, skip_log)
                return saved(store, {"key": key, "format": found, "skipped": reasons})

            stored = on_main_process(join)
            del parts
    if not (reused and is_main_process()):
        # The saved rows, memory-mapped, rather than the bytes this process read or joined.
        reopened = RowStore.open(folder, key)
        if reopened is not None:
            stored = reopened
        elif not is_main_process():
            logger.info("%s: the rows the main process read are not in %s here; reading the file", path, folder)
            stored = read_whole()
    return stored[0], found


def prediction_examples(path, image_root, file_format: str = "auto", system_prompt: str | None = None) -> list[dict]:
    """Examples for `common.outputs.predict --jsonl`: a conversation that ends with a user message has that message
    answered, the turns before it as context; otherwise its first turn is answered and its first answer is the
    reference (this project's JSONL: `common.data.dataset.jsonl_prediction_examples`)."""
    conversations, file_format = read_conversations(path, image_root, file_format, system_prompt, answered=False)
    if file_format == "jsonl":
        return conversations
    examples = []
    for conversation in conversations:
        if conversation["messages"][-1]["role"] == "user":
            examples.append({**conversation, "references": []})
        else:
            examples += evaluation_examples(conversation, "first")
    return examples


def file_conversation(row, file_format: str, root: Path, file_name: str, where: str, answered: bool = True) -> dict:
    """One row of a LLaVA or messages file as a conversation; DataError/FileNotFoundError naming `where`."""
    if row_format(row) != file_format:
        expected = {"llava": "{\"image\", \"conversations\": [{\"from\", \"value\"}]}", "messages": "{\"messages\": [{\"role\", \"content\"}]}"}
        raise DataError(f"{where}: not a {file_format} row; expected {expected[file_format]}, got {row!r:.100}")

    def resolve(relative, what):
        return _resolve_image(relative, root, f"{where}: {what}")

    try:
        if file_format == "llava":
            images = [resolve(path, f"image[{k}]") for k, path in enumerate(_as_list(row.get("image")))]
            messages = placed_images(llava_messages(row["conversations"]), images)
            if isinstance(row.get("system"), str):
                messages = with_system(messages, row["system"])
        else:
            row_images = [resolve(path, f"images[{k}]") for k, path in enumerate(_as_list(row.get("images")))]
            messages, images = chat_messages(row["messages"], row_images, resolve)
        conversation = _checked(messages, images, answered)
    except ExampleError as error:
        raise DataError(f"{where}: {error}") from None
    example_id = row.get("id")
    if example_id is not None and not isinstance(example_id, (str, int)):
        raise DataError(f"{where}: \"id\" must be a string or a number, got {example_id!r:.100}")
    # Without an id, the row's place names it; the file's name keeps it apart from another file's rows.
    conversation["id"] = str(example_id) if example_id is not None else f"{file_name}:{where.rsplit(':', 1)[1]}"
    return conversation


# ----------------------------------------------------------------------------------------------------------
# Hub and save_to_disk datasets
# ----------------------------------------------------------------------------------------------------------


class ColumnConversations:
    """`RecipeDataset`'s ``to_example`` for a `datasets.Dataset` whose `messages_column` holds the turns and
    `images_column` the images (PIL images, or paths relative to `image_root`)."""

    def __init__(self, messages_column: str, images_column: str, image_root: str | None, system_prompt: str | None, name: str):
        self.messages_column, self.images_column = messages_column, images_column
        self.image_root = Path(image_root).resolve() if image_root else None
        self.system_prompt, self.name = system_prompt, name

    def check_columns(self, dataset: datasets.Dataset) -> None:
        if self.messages_column not in dataset.column_names:
            raise DataError(f"{self.name} has no column {self.messages_column!r} (columns: {dataset.column_names}); pass --messages_column")

    def __call__(self, row: dict, index: int) -> dict:
        row_images = [self._image(image, k) for k, image in enumerate(_as_list(row.get(self.images_column)))]
        messages, images = column_conversation(row[self.messages_column], row_images, self._image)
        conversation = _checked(with_system(messages, self.system_prompt), images, answered=True)
        conversation["id"] = str(row["id"]) if row.get("id") is not None else f"{self.name}[{index}]"
        return conversation

    def _image(self, image, position):
        if not isinstance(image, str):
            return image
        if self.image_root is None:
            raise ExampleError(f"images[{position}] is the path {image!r}; pass --image_root, the folder such paths are relative to")
        return _resolve_image(image, self.image_root, f"images[{position}]")


def _turn_shape(turns) -> str:
    first = turns[0] if isinstance(turns, list) and turns else None
    if isinstance(first, dict) and "role" in first:
        return "messages"
    if isinstance(first, dict) and "from" in first:
        return "llava"
    if isinstance(first, dict) and "user" in first:
        return "pairs"
    raise ExampleError(f"the conversation column holds {turns!r:.100}; expected a list of {{\"role\", \"content\"}}, {{\"from\", \"value\"}} or {{\"user\", \"assistant\"}} turns")


def column_conversation(turns, images: list, resolve=lambda image, what: image) -> tuple[list[dict], list]:
    """(messages, images) of a dataset row's turns, in any of the three turn shapes, and its images."""
    shape = _turn_shape(turns)
    if shape == "messages":
        return chat_messages(turns, images, resolve)
    return placed_images(llava_messages(turns) if shape == "llava" else pair_messages(turns), images), images


def answered_turns(dataset: datasets.Dataset, messages_column: str, name: str) -> list[int]:
    """How many assistant turns each row of a dataset has, from its conversation column alone."""
    counts = []
    for index, turns in enumerate(dataset.select_columns([messages_column])[messages_column]):
        try:
            shape = _turn_shape(turns)
        except ExampleError as error:
            raise DataError(f"{name} row {index}: {error}") from None
        if shape == "pairs":
            counts.append(sum("assistant" in turn for turn in turns))
        elif shape == "llava":
            counts.append(sum(LLAVA_ROLES.get(turn.get("from")) == "assistant" for turn in turns))
        else:
            counts.append(sum(turn.get("role") == "assistant" for turn in turns))
    return counts


# ----------------------------------------------------------------------------------------------------------
# Evaluation turns, held-out rows
# ----------------------------------------------------------------------------------------------------------


def answer_positions(messages: list[dict], eval_turn: str) -> list[int]:
    """Indices of the assistant messages `eval_turn` scores."""
    answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    return {"first": answers[:1], "last": answers[-1:], "all": answers}[eval_turn]


def evaluation_examples(conversation: dict, eval_turn: str) -> list[dict]:
    """The evaluation examples of a conversation: per chosen assistant turn, the messages before it (its context
    and the question) and that answer as the reference."""
    positions = answer_positions(conversation["messages"], eval_turn)
    examples = []
    for number, position in enumerate(positions, start=1):
        example_id = conversation["id"] if len(positions) == 1 else f"{conversation['id']}#{number}"
        examples.append(
            {
                "id": example_id,
                "images": conversation["images"],
                "messages": conversation["messages"][:position],
                "references": [conversation["messages"][position]["content"]],
            }
        )
    return examples


class EvaluationTurns:
    """The evaluation examples of a dataset's rows, made lazily: row `rows[i]`, its `answers[i]`-th scored turn."""

    def __init__(self, dataset, to_conversation, eval_turn: str, counts: list[int]):
        self.dataset, self.to_conversation, self.eval_turn = dataset, to_conversation, eval_turn
        self.pairs = [(row, turn) for row, count in enumerate(counts) for turn in range(count if eval_turn == "all" else min(count, 1))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        row, turn = self.pairs[index]
        return evaluation_examples(self.to_conversation(self.dataset[row], row), self.eval_turn)[turn]

    @property
    def _fingerprint(self) -> str:
        """These examples' identity for `dataset.data_fingerprint`, as a `datasets.Dataset` has one: the rows',
        the conversion's and the turns scored, with no row converted (which would decode its images)."""
        conversion = json.dumps(converter_identity(self.to_conversation), sort_keys=True, default=str)
        return f"{self.dataset._fingerprint}:{self.eval_turn}:{len(self.pairs)}:{conversion}"


def hold_out(rows, fraction: float, seed: int):
    """(training rows, evaluation rows): a seeded random `fraction` of the rows held out, at least one."""
    count = len(rows)
    held = max(1, round(count * fraction))
    if held >= count:
        raise DataError(f"--eval_fraction {fraction} of {count} rows leaves nothing to train on; lower it or pass --eval_file")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    eval_indices, train_indices = sorted(order[:held]), sorted(order[held:])
    if isinstance(rows, (datasets.Dataset, RowStore)):
        return rows.select(train_indices), rows.select(eval_indices)
    return [rows[i] for i in train_indices], [rows[i] for i in eval_indices]


# ----------------------------------------------------------------------------------------------------------
# Warnings that save a run
# ----------------------------------------------------------------------------------------------------------


def _image_key(image) -> str:
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes):
        return hashlib.sha1(image).hexdigest()
    return str(image)


def row_summaries(rows, messages_column: str | None = None, images_column: str | None = None) -> RowSummaries:
    """What `data_warnings` compares of each conversation (`RowSummaries`): kept by a `RowStore`, or read from a
    list of conversations, or from a dataset's raw columns (image bytes hashed, nothing decoded)."""
    if isinstance(rows, RowStore):
        return rows.summaries()
    summaries = []
    if isinstance(rows, datasets.Dataset):
        columns = [c for c in ("id", messages_column, images_column) if c in rows.column_names]
        raw = rows.select_columns(columns).with_format("arrow")
        for start in range(0, len(raw), 256):
            for row in raw[start : start + 256].to_pylist():
                images = tuple(_image_key(image) for image in _as_list(row.get(images_column)))
                try:
                    messages = column_conversation(row[messages_column], list(images))[0]
                except ExampleError:
                    # The validation pass reports the row; it just has no summary.
                    continue
                summaries.append((row.get("id"), images) + first_exchange(messages))
        return RowSummaries.of(summaries)
    for conversation in rows:
        summaries.append((conversation["id"], tuple(map(_image_key, conversation["images"]))) + first_exchange(conversation["messages"]))
    return RowSummaries.of(summaries)


def data_warnings(train_rows: int, train: RowSummaries, evaluation: RowSummaries, batch_size: int, steps: int) -> list[str]:
    """The warnings of `warn_about_data`, as lines."""
    warnings = []
    if train_rows < batch_size:
        warnings.append(f"the training data has {train_rows} rows, fewer than one global batch (--batch_size {batch_size}); every step repeats rows or runs short")
    if steps < MIN_USEFUL_STEPS:
        warnings.append(f"the whole run makes {steps} optimizer steps (fewer than {MIN_USEFUL_STEPS}); raise --num_train_epochs or --max_steps, or lower --batch_size")
    same_id = (evaluation.ids != 0) & np.isin(evaluation.ids, train.ids[train.ids != 0])
    overlapping = np.flatnonzero(same_id | np.isin(evaluation.inputs, train.inputs))
    if len(overlapping):
        warnings.append(
            f"{len(overlapping)} of {len(evaluation)} evaluation rows are also training rows (same id, or same images and "
            f"prompt; first: id {evaluation.describe(int(overlapping[0]))[0]!r}); the scores will flatter the model: hold out other rows"
        )
    answered = train.answers[train.answers != 0]
    if len(answered):
        values, counts = np.unique(answered, return_counts=True)
        count = int(counts.max())
        if count > len(train) / 2:
            answer = train.describe(int(np.flatnonzero(train.answers == values[counts.argmax()])[0]))[1]
            warnings.append(
                f"{count} of {len(train)} training rows have the same answer {answer!r:.60}; a model can score "
                "well by always giving it: check the data, or balance it"
            )
    return warnings


def optimizer_steps(rows: int, batch_size: int, max_steps: int, num_train_epochs: float) -> int:
    """How many optimizer steps a run makes: `max_steps` when positive, else the epochs over `rows` at the global
    `batch_size`."""
    if max_steps and max_steps > 0:
        return max_steps
    return math.ceil(math.ceil(rows / batch_size) * num_train_epochs)


def warn_about_data(train_set, train_summaries: RowSummaries, eval_summaries: RowSummaries, batch_size: int, max_steps: int,
                    num_train_epochs: float) -> None:
    """One warning line for each problem that would make the run useless: too few rows or steps (at the global
    `batch_size`, for `max_steps` or `num_train_epochs`), evaluation rows that are training rows, a constant
    answer."""
    steps = optimizer_steps(len(train_set), batch_size, max_steps, num_train_epochs)
    for warning in data_warnings(len(train_set), train_summaries, eval_summaries, batch_size, steps):
        logger.warning("%s", warning)


class CustomData:
    """The training and evaluation rows `finetune_hf_trainer_custom.py` reads: data files or a dataset, an
    evaluation file, split or seeded held-out fraction; `datasets` makes the `RecipeDataset`s, `warn` the
    warnings of `warn_about_data` about them. Data files are read once per run and kept in `run_folder` (the run's
    output folder) as `RowStore`s (`stored_conversations`)."""

    def __init__(self, options, seed: int, skip_log, run_folder):
        self.options = options
        self.name = Path(options.train_file).stem if options.train_file else (options.dataset_name or Path(options.dataset_path).name)
        if options.train_file:
            root = options.image_root or str(Path(options.train_file).parent)
            self.columns = None
            self.train, self.format = stored_conversations(options.train_file, root, options.format, options.system_prompt, skip_log, run_folder)
            if options.eval_file:
                self.eval = stored_conversations(options.eval_file, root, options.format, options.system_prompt, skip_log, run_folder)[0]
        else:
            self.format = "dataset"
            self.columns = ColumnConversations(options.messages_column, options.images_column, options.image_root, options.system_prompt, self.name)
            self.train = load_split(options.dataset_name, options.dataset_config, options.split, options.dataset_path)
            self.columns.check_columns(self.train)
            if options.eval_split:
                self.eval = load_split(options.dataset_name, options.dataset_config, options.eval_split, options.dataset_path)
                self.columns.check_columns(self.eval)
        if options.eval_fraction:
            self.train, self.eval = hold_out(self.train, options.eval_fraction, seed)
        self.train = first_rows(self.train, options.max_train_samples)
        self.eval = first_rows(self.eval, options.max_eval_samples)

    def datasets(self) -> tuple[RecipeDataset, RecipeDataset]:
        options, turn = self.options, self.options.eval_turn
        if self.columns is None:
            train_name = Path(options.train_file).name
            eval_name = Path(options.eval_file).name if options.eval_file else f"{train_name} held out"
            eval_source = [example for conversation in self.eval for example in evaluation_examples(conversation, turn)]
        else:
            train_name = f"{self.name} {options.split}"
            eval_name = f"{self.name} {options.eval_split}" if options.eval_split else f"{train_name} held out"
            eval_source = EvaluationTurns(self.eval, self.columns, turn, answered_turns(self.eval, options.messages_column, eval_name))
        files = [options.train_file] if options.train_file else []
        train_set = RecipeDataset(self.train, self.columns, train_name, data_files=files)
        eval_files = [options.eval_file] if options.eval_file else files
        eval_set = RecipeDataset(eval_source, name=f"{eval_name} ({turn} turn{'s' if turn == 'all' else ''})", for_training=False, data_files=eval_files)
        return train_set, eval_set

    def warn(self, train_set: RecipeDataset, batch_size: int, max_steps: int, num_train_epochs: float) -> None:
        if not is_main_process():
            # Every rank holds the same rows: one set of warnings is enough.
            return
        columns = (self.options.messages_column, self.options.images_column) if self.columns is not None else ()
        warn_about_data(train_set, row_summaries(self.train, *columns), row_summaries(self.eval, *columns), batch_size,
                        max_steps, num_train_epochs)


__all__ = [
    "CustomData",
    "ColumnConversations",
    "EvaluationTurns",
    "FILE_FORMATS",
    "EVAL_TURNS",
    "answered_turns",
    "detect_format",
    "evaluation_examples",
    "file_rows",
    "hold_out",
    "read_conversations",
    "row_summaries",
    "warn_about_data",
]
