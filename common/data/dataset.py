"""Rows -> examples: a lazy Dataset over any row source, and the JSONL format for bringing your own data.

`RecipeDataset` turns rows (of a `datasets.Dataset` or a list) into the examples of `common/data/conversation.py`
one at a time, inside the DataLoader workers, so image decoding is spread over them. Its `scan` (the validation
pass) gives each example's exact token counts from image headers, and can check on a thread pool that every
image file decodes; its `lengths` gives the token lengths alone, for length-grouped batching.

`load_jsonl_conversations` / `jsonl_eval_examples` read the custom-data JSONL format (the format
`convert_ucf101.py` writes) eagerly, checking every line and image file up front, and leave image decoding to
`RecipeDataset`.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import json
import operator
import os
import random
import stat
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
from PIL import Image, JpegImagePlugin, PngImagePlugin
from tqdm import tqdm

from ..errors import DataError, ExampleError, error_reason
from ..model.image_processing_phi3v import (
    TRANSPOSING_ORIENTATIONS,
    check_rgb_convertible,
    exif_orientation,
    to_rgb,
    upright,
)
from ..model.processing_phi3v import IMAGE_TAG_PATTERN, Phi3VProcessor
from .collator import LoadingError, TokenCounts, example_tokens
from .conversation import check_messages

__all__ = [
    "RecipeDataset",
    "ScannedRow",
    "check_image_decodes",
    "image_check_pool",
    "load_image",
    "load_jsonl_conversations",
    "jsonl_eval_examples",
    "jsonl_prediction_examples",
]

# Below these sizes a progress bar would only flash by.
PROGRESS_MIN_ROWS = 1000
PROGRESS_MIN_BYTES = 1 << 20
# Rows read per Arrow slice when computing lengths: large enough to amortise the slicing, small enough that a
# slice of big documents stays a few MB.
LENGTH_SLICE_ROWS = 256
# The validation pass sends image checks to its pool in chunks of rows, each one task: large enough that the
# hand-over of a task costs little next to decoding small images, small enough that a chunk of a hub dataset's
# image bytes stays a few MB. At most CHECK_CHUNKS_IN_FLIGHT chunks wait, bounding the bytes held.
CHECK_CHUNK_ROWS = 32
CHECK_CHUNK_BYTES = 8 << 20
CHECK_CHUNKS_IN_FLIGHT = 32


def load_image(path) -> Image.Image:
    """Open an image file and decode it as RGB with `to_rgb` (transparency is dropped, not composited), turned
    upright by its EXIF orientation as an image viewer shows it (`upright`: the rule of every path, hub rows
    included, which `datasets` turns upright when it decodes them)."""
    with Image.open(path) as image:
        return to_rgb(upright(image))


def _load_file(path) -> Image.Image:
    """`load_image` inside a row, whose error names the file: a row may hold several (8 video frames)."""
    try:
        return load_image(path)
    except (OSError, Image.DecompressionBombError) as error:
        raise OSError(f"image file {path} does not decode: {error_reason(error)}") from error


def check_image_decodes(source) -> None:
    """Decode enough of one image file (a path, or the file's bytes) to find a truncated or damaged one.

    Raises OSError (or PIL's UnidentifiedImageError) for a file that would fail while training reads it, and
    ValueError for a PIL mode `to_rgb` cannot convert. A JPEG is decoded at 1/8 scale: libjpeg still reads
    every byte of the compressed data but skips most of the inverse DCT (~1.6x faster on a page scan). A PNG
    is checked chunk by chunk against its CRCs without inflating the pixels (~15x faster than decoding):
    truncation and damaged bytes fail the CRC or the chunk read. Other formats are decoded fully.
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        check_rgb_convertible(image.mode)
        if isinstance(image, PngImagePlugin.PngImageFile):
            image.verify()
            return
        if isinstance(image, JpegImagePlugin.JpegImageFile):
            image.draft(image.mode, (1, 1))
        image.load()


def image_check_pool(workers: int | None = None) -> ThreadPoolExecutor:
    """Threads for the validation pass's image checks; `workers` defaults to this process's CPUs, shared with
    the other ranks of its node, which run the same pass at the same time.

    Threads, not processes: PIL decodes without holding the GIL, and threads need no copy of the image bytes.
    Measured in bench/RESULTS.md ("Validation pass"): on document pages threads were faster than forked
    processes; on small images neither was faster in every run; spawned processes spend seconds importing torch.
    """
    if workers is None:
        workers = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return ThreadPoolExecutor(workers, thread_name_prefix="image-check")


class ScannedRow(NamedTuple):
    """One row as the validation pass found it: its token counts, or the ExampleError that makes it unusable."""

    index: int
    example_id: object
    tokens: TokenCounts | None
    error: ExampleError | None


ToExample = Callable[[object, int], Mapping]


class RecipeDataset(torch.utils.data.Dataset):
    """Examples made lazily from an indexable row source.

    `source`: anything with `len()` and integer indexing (a `datasets.Dataset`, a list of dicts, ...).
    `to_example(row, index)`: returns the example for a row (a training example, or an evaluation example
    when `for_training=False`, see `common/data/conversation.py`); None means the rows already are examples.
    Its images may be PIL images or image file paths (str or os.PathLike): paths are opened with
    `load_image` when the item is read. The returned dict is copied, never modified, and gets an ``id``
    when it has none: the row's ``id`` if it has one, else ``"{name}[{index}]"``, so errors further down
    (e.g. in the collator) name the row.

    `dataset[index]` converts and checks one row (message structure, image tags, references); any failure
    raises `ExampleError` naming `name`, the row index and the row's id.

    Random draws in `to_example` with the `random` module (one answer of several, say) follow from `seed`, the
    epoch (`set_epoch`; the Trainer sets both, see `common.training.recipe`) and the row's index alone: `random` is seeded
    from the three for each call and put back as it was afterwards. So an example is the same whichever process
    builds it, under any --dataloader_num_workers, and after a resume.
    """

    def __init__(
        self,
        source,
        to_example: ToExample | None = None,
        name: str = "dataset",
        for_training: bool = True,
        skip_log=None,
        original_indices: list[int] | None = None,
        seed: int = 0,
        data_files: list | None = None,
    ):
        if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
            raise TypeError(
                f"{name}: the source must support len() and indexing (a datasets.Dataset or a list), "
                f"got {type(source).__name__}"
            )
        self.source = source
        self.to_example = to_example
        self.name = name
        self.for_training = for_training
        # With a skip log (`common.data.validation.SkipLog`), a row that fails when read is recorded and read as None
        # (the collator drops it) instead of stopping the run.
        self.skip_log = skip_log
        # After `subset`, rows keep the index they had in the full data: to_example and errors see that one.
        self.original_indices = original_indices
        # Rows the validation pass left out of an evaluation split (`validate_evaluation_data`), for its files.
        self.skipped: list[dict] = []
        self.seed = seed
        # In shared memory, so that persistent DataLoader workers see each new epoch too.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._lengths: dict[tuple[int, int], tuple[Phi3VProcessor, np.ndarray]] = {}
        # The files the rows were read from, for the fingerprint of the validation pass's cache (common.data.scan_cache).
        self.data_files = [str(path) for path in data_files or ()]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict | None:
        index = operator.index(index)
        # IndexError must stay an IndexError: iteration over a Dataset without __iter__ stops on it.
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} rows")
        row = None
        try:
            row = self.source[index]
            example = self._convert(row, index)
            self._check(example)
            example["images"] = [
                _load_file(image) if isinstance(image, (str, os.PathLike)) else image for image in example["images"]
            ]
        except Exception as error:
            wrapped = self._error(index, row, error)
            if self.skip_log is None:
                raise wrapped from error
            self.skip_log.record(str(wrapped), stage="reading")
            return None
        return example

    def scan(self, processor: Phi3VProcessor, image_pool: Executor | None = None, rows: range | None = None) -> Iterator[ScannedRow]:
        """Every row in order (or those of `rows`, a range of indices), with its exact token counts or the
        ExampleError of that row.

        Token counts come from text and image headers. With an `image_pool` (`image_check_pool()`), every image
        given as a file path or stored in an image column of a `datasets.Dataset` is also checked with
        `check_image_decodes` on that pool, in chunks of rows, while this process converts and tokenizes the
        rows after them; so a truncated file stops the run here rather than mid-training. PIL images that
        `to_example` hands over are taken as they are.
        """
        indices = range(len(self)) if rows is None else rows
        rows = self._rows_for_lengths(indices.start, indices.stop)
        progress = tqdm(indices, desc=f"{self.name}: checking rows", unit="example", disable=len(indices) < PROGRESS_MIN_ROWS)
        in_flight: deque[tuple[list[tuple[ScannedRow, object]], Future]] = deque()
        chunk: list[tuple[ScannedRow, object]] = []
        chunk_files: list[list[tuple[str, bytes | str | os.PathLike]]] = []
        chunk_bytes = 0
        for index in progress:
            scanned, row, files = self._scan_row(index, rows, processor, image_pool is not None)
            if image_pool is None:
                yield scanned
                continue
            chunk.append((scanned, row))
            chunk_files.append(files)
            chunk_bytes += sum(len(source) for _, source in files if isinstance(source, bytes))
            if len(chunk) < CHECK_CHUNK_ROWS and chunk_bytes < CHECK_CHUNK_BYTES and index < indices.stop - 1:
                continue
            in_flight.append((chunk, image_pool.submit(_check_image_chunk, chunk_files)))
            chunk, chunk_files, chunk_bytes = [], [], 0
            while in_flight and (len(in_flight) > CHECK_CHUNKS_IN_FLIGHT or in_flight[0][1].done()):
                yield from self._checked(*in_flight.popleft())
        while in_flight:
            yield from self._checked(*in_flight.popleft())

    def _scan_row(self, index, rows, processor, with_files: bool) -> tuple[ScannedRow, object, list]:
        """One row checked by this process, and the image files the pool is to decode for it."""
        row, opened = None, {}
        try:
            row, opened = next(rows)
            if isinstance(row, Exception):
                unreadable, row = row, None
                raise unreadable
            example = self._convert(row, index)
            self._check(example)
            tokens = example_tokens(processor, example)
            files = _image_files(example["images"], opened) if with_files else []
            return ScannedRow(index, example["id"], tokens, None), row, files
        except Exception as error:
            return ScannedRow(index, self.row_id(index, row), None, self._error(index, row, error)), row, []
        finally:
            for image, _ in opened.values():
                image.close()

    def _checked(self, chunk: list[tuple[ScannedRow, object]], future: Future) -> Iterator[ScannedRow]:
        for (scanned, row), error in zip(chunk, future.result()):
            yield scanned if error is None else scanned._replace(tokens=None, error=self._error(scanned.index, row, error))

    def subset(self, indices: list[int]) -> "RecipeDataset":
        """The same dataset restricted to `indices` (in that order), keeping name, conversion and skip log."""
        if isinstance(self.source, datasets.Dataset):
            source = self.source.select(indices)
        else:
            source = [self.source[index] for index in indices]
        original = [self.original_index(index) for index in indices]
        subset = RecipeDataset(source, self.to_example, self.name, self.for_training, self.skip_log, original, self.seed, self.data_files)
        subset._epoch = self._epoch
        return subset

    def set_epoch(self, epoch: int) -> None:
        """The epoch that random draws in `to_example` follow (with `seed` and the row's index)."""
        self._epoch.fill_(epoch)

    def original_index(self, index: int) -> int:
        return index if self.original_indices is None else self.original_indices[index]

    def lengths(self, processor: Phi3VProcessor) -> list[int]:
        """Each training example's exact token length with `processor` (what `Phi3VCollator.length_of` gives).

        Pixels are not decoded: image sizes come from file headers (a `datasets.Dataset`'s image columns are
        read undecoded and handed to `to_example` as lazily opened PIL images; only EXIF-rotated images are
        decoded, to turn them upright as `datasets` does). A `to_example` that draws randomly (e.g. one answer
        of several) gives the length of one draw. Memoised per processor and crop count; the validation pass hands
        over the lengths it measured (`remember_lengths`), so length-grouped batching does not scan again.
        """
        if not self.for_training:
            raise ValueError(
                f"{self.name}: lengths are token lengths of training examples; this dataset holds evaluation examples"
            )
        cached = self._lengths.get(_lengths_key(processor))
        if cached is not None and cached[0] is processor:
            return cached[1].tolist()
        result = []
        for scanned in self.scan(processor):
            if scanned.error is not None:
                raise scanned.error
            result.append(scanned.tokens.total)
        self.remember_lengths(processor, np.asarray(result, dtype=np.int32))
        return result

    def remember_lengths(self, processor: Phi3VProcessor, lengths: np.ndarray) -> None:
        """Take `lengths` (one per row, in order) as what `lengths(processor)` returns."""
        if len(lengths) != len(self):
            raise ValueError(f"{self.name}: {len(lengths)} lengths for {len(self)} rows")
        self._lengths[_lengths_key(processor)] = (processor, np.asarray(lengths, dtype=np.int32))

    def example_id(self, index: int):
        """The id the validation pass names row `index` by, read without decoding its images."""
        row, opened = next(self._rows_for_lengths(index, index + 1))
        try:
            if isinstance(row, Exception):
                return self.row_id(index)
            return self._convert(row, index)["id"]
        except Exception:
            return self.row_id(index, row)
        finally:
            for image, _ in opened.values():
                image.close()

    def _convert(self, row, index: int) -> dict:
        if self.to_example is None:
            example = row
        else:
            original = self.original_index(index)
            with _seeded_random(f"{self.seed}:{int(self._epoch)}:{original}"):
                example = self.to_example(row, original)
        if not isinstance(example, Mapping):
            raise ExampleError(f"to_example must return a dict, got {type(example).__name__}")
        example = dict(example)
        if example.get("id") is None:
            row_id = row.get("id") if isinstance(row, Mapping) else None
            example["id"] = row_id if row_id is not None else f"{self.name}[{self.original_index(index)}]"
        images = example.get("images")
        if images is None:
            images = []
        if not isinstance(images, (list, tuple)):
            raise ExampleError(f"'images' must be a list of PIL images or file paths, got {type(images).__name__}")
        example["images"] = list(images)
        return example

    def _check(self, example: dict) -> None:
        for position, image in enumerate(example["images"]):
            if not isinstance(image, (Image.Image, str, os.PathLike)):
                raise ExampleError(
                    f"images[{position}] is a {type(image).__name__}; give PIL images or image file paths"
                )
            if isinstance(image, Image.Image):
                check_rgb_convertible(image.mode)
        check_messages(example.get("messages"), len(example["images"]), for_training=self.for_training)
        if not self.for_training:
            references = example.get("references")
            if not isinstance(references, list) or not references or not all(isinstance(r, str) for r in references):
                raise ExampleError(f"'references' must be a non-empty list of strings, got {references!r:.200}")

    def row_id(self, index: int, row=None):
        """The id a row carries, as far as it can be read even when the row itself failed."""
        return row.get("id") if isinstance(row, Mapping) else self._stored_id(index)

    def _error(self, index: int, row, error: Exception) -> LoadingError:
        row_id = self.row_id(index, row)
        where = f"{self.name} row {self.original_index(index)}" + (f" (id {row_id!r})" if row_id is not None else "")
        if isinstance(error, KeyError) and isinstance(row, Mapping):
            # The usual cause is a dataset without a column the recipe reads: name the columns it does have.
            return LoadingError(
                f"{where}: the row has no field {error}; its fields are {sorted(row)}. Point the recipe at data "
                "in the schema it expects, or adapt its to_example function."
            )
        return LoadingError(
            f"{where}: {type(error).__name__}: {error}. Fix this row of the data (or the to_example function "
            "that converts it), or pass --skip_bad_examples to leave such rows out."
        )

    def _stored_id(self, index: int):
        # The row itself may be what failed (e.g. an undecodable image); its id column can still be read raw.
        if isinstance(self.source, datasets.Dataset) and "id" in self.source.column_names:
            return self.source.with_format("arrow")[index : index + 1].column("id")[0].as_py()
        return None

    def _rows_for_lengths(self, first: int = 0, stop: int | None = None) -> Iterator[tuple[object, dict[int, tuple[Image.Image, bytes | str]]]]:
        """(row, {id(image): (image, the bytes or path it was opened from)} for the images opened for it) per
        index from `first` to `stop`; `datasets` rows come with image columns undecoded, and a row whose images
        cannot even be opened comes as its exception."""
        stop = len(self.source) if stop is None else stop
        if not isinstance(self.source, datasets.Dataset):
            for index in range(first, stop):
                yield self.source[index], {}
            return
        features = self.source.features
        raw = self.source.with_format("arrow")
        for start in range(first, stop, LENGTH_SLICE_ROWS):
            for values in raw[start : min(start + LENGTH_SLICE_ROWS, stop)].to_pylist():
                opened: dict[int, tuple[Image.Image, bytes | str]] = {}
                try:
                    row = {key: _decode_lazily(value, features[key], opened) for key, value in values.items()}
                except Exception as error:
                    # Handed over, not raised: raising here would end the generator and every row after this one.
                    row = error
                yield row, opened


def _lengths_key(processor: Phi3VProcessor) -> tuple[int, int]:
    # Lengths follow the processor's crop count, which a caller may change on the same processor.
    return id(processor), processor.image_processor.num_crops


def _stable(value):
    """JSON for the odd values a row may hold, the same in every process (no object addresses)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, bytes):
        return "bytes:" + hashlib.sha256(value).hexdigest()
    if hasattr(value, "tobytes") and hasattr(value, "mode"):
        return f"image:{value.mode}:{value.size}:" + hashlib.sha256(value.tobytes()).hexdigest()
    return type(value).__name__


def data_fingerprint(dataset) -> str:
    """The training rows, cheaply: a `datasets.Dataset`'s own fingerprint (it follows select and map), or a hash
    of in-memory rows with their image paths taken relative to the folder they share, so that data copied
    elsewhere (a node's scratch disk) keeps its fingerprint. Image files are not read."""
    source = getattr(dataset, "source", dataset)
    convert = getattr(dataset, "to_example", None)
    digest = hashlib.sha256()
    header = [getattr(dataset, "name", None), len(dataset), getattr(convert, "__qualname__", None)]
    digest.update(json.dumps(header).encode())
    fingerprint = getattr(source, "_fingerprint", None)
    if isinstance(fingerprint, str):
        digest.update(fingerprint.encode())
        return digest.hexdigest()[:16]
    rows = [source[index] for index in range(len(source))]
    paths = [
        os.fspath(image)
        for row in rows
        if isinstance(row, dict)
        for image in row.get("images") or ()
        if isinstance(image, (str, os.PathLike)) and os.path.isabs(image)
    ]
    root = os.path.commonpath(paths) if paths else None
    if root and len(set(paths)) == 1:
        root = os.path.dirname(root)
    for row in rows:
        if root and isinstance(row, dict) and row.get("images"):
            row = {**row, "images": [os.path.relpath(image, root) if isinstance(image, (str, os.PathLike)) and os.path.isabs(image)
                                     else image for image in row["images"]]}
        digest.update(json.dumps(row, sort_keys=True, default=_stable).encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _seeded_random(key: str):
    """Draws of the `random` module inside the block follow from `key` alone; its state outside is untouched."""
    state = random.getstate()
    random.seed(key)
    try:
        yield
    finally:
        random.setstate(state)


def _image_files(images: list, opened: dict) -> list[tuple[str, bytes | str | os.PathLike]]:
    """(name for errors, path or bytes) of each image of an example that comes from a file not decoded yet."""
    files = []
    for position, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            files.append((f"image file {image}", image))
        elif id(image) in opened:
            source = opened[id(image)][1]
            files.append((f"images[{position}]" if isinstance(source, bytes) else f"image file {source}", source))
    return files


def _check_image_chunk(chunk: list[list[tuple[str, bytes | str | os.PathLike]]]) -> list[Exception | None]:
    """Runs in the pool: per row, None or the exception of the first of its images that fails."""
    problems: list[Exception | None] = []
    for files in chunk:
        problem = None
        for name, source in files:
            try:
                check_image_decodes(source)
            except ValueError as error:
                # A mode to_rgb cannot convert: the file itself is fine.
                problem = ValueError(f"{name}: {error}")
            except Exception as error:
                problem = OSError(f"{name} does not decode: {error_reason(error)}")
            if problem is not None:
                break
        problems.append(problem)
    return problems


def _decode_lazily(value, feature, opened: dict):
    """`datasets`' decoding of one raw value, except that images are opened without decoding their pixels."""
    if value is None:
        return None
    if isinstance(feature, datasets.Image) and feature.decode:
        return _open_image_lazily(value, feature, opened)
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return [_decode_lazily(item, feature.feature, opened) for item in value]
    if isinstance(feature, dict):
        return {
            key: _decode_lazily(item, feature[key], opened) if key in feature else item for key, item in value.items()
        }
    if getattr(feature, "decode", False) and hasattr(feature, "decode_example"):
        return feature.decode_example(value)
    return value


def _open_image_lazily(value: dict, feature: datasets.Image, opened: dict) -> Image.Image:
    if value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
        opened[id(image)] = image, value["bytes"]
    elif value.get("path") is not None and os.path.isfile(value["path"]):
        image = Image.open(value["path"])
        opened[id(image)] = image, value["path"]
    else:
        # Remote paths need datasets' own fetching; such rows are rare enough to decode fully.
        return feature.decode_example(value)
    # Only a change of size matters to the token count, and only these orientations change it.
    if exif_orientation(image) in TRANSPOSING_ORIENTATIONS:
        return upright(image)
    return image


# ----------------------------------------------------------------------------------------------------------
# JSONL custom data
# ----------------------------------------------------------------------------------------------------------


def load_jsonl_conversations(jsonl_path, image_root, skip_log=None) -> list[dict]:
    """Read a conversations JSONL file into training examples; the format for bringing your own data.

    One JSON object per line (blank lines are skipped), UTF-8, exactly what `convert_ucf101.py` writes::

        {"id": "train-0000000000", "source": "ucf101",
         "conversations": [{"images": ["train/Archery/v_Archery_g01_c01.0.jpg", ...],
                            "user": "Classify the video into one of the following classes: ... .",
                            "assistant": "Archery"}]}

    - ``id`` (string, required, unique in the file): names the example in errors and evaluation outputs.
    - ``source`` (string, optional): where the example comes from; kept as the example's ``source``.
    - ``conversations`` (required, non-empty list): the turns, in order. Each turn has ``user`` (string) and
      ``assistant`` (string, not empty: the training target), and optionally ``images``: a list of image
      paths relative to `image_root`, using ``/``. Normally only the first turn has images.

    Each line becomes ``{"id", "source", "images": [absolute image paths], "messages": [...]}``: the images are
    the union of all turns' images in order of appearance (a repeated path counts once), and the messages
    alternate user / assistant contents turn by turn. The first user message gets the image tags
    ``<|image_1|>...<|image_N|>`` followed by a newline in front of its text, as the reference prompts have
    them, unless the text already holds the tags (then they must be exactly ``<|image_1|>`` .. ``<|image_N|>``
    in order). Later turns must not hold tags. A line without images gives a text-only example.

    Everything is checked here, with ``path:line`` in the message: JSON syntax, required keys and types,
    message structure, and every image path, which must be relative, stay inside `image_root` once ``..`` and
    symlinks are resolved (so a data file cannot make training read arbitrary files), and name an existing
    file. Pixels are not read: wrap the result in `RecipeDataset`, which opens the image files (PIL, RGB)
    when an example is read, in the DataLoader workers.

    With a `skip_log` (`common.data.validation.SkipLog`), a bad line is recorded there and left out instead of
    raising; problems with the file as a whole still raise.
    """
    return _read_conversations(jsonl_path, image_root, skip_log)


def jsonl_eval_examples(jsonl_path, image_root, skip_log=None) -> list[dict]:
    """Evaluation examples from a conversations JSONL file (format: `load_jsonl_conversations`).

    Each line gives ``{"id", "source", "images", "messages": [the first user message], "references":
    [the first assistant answer]}``; later turns are not evaluated. Same checks; images stay paths, opened by
    `RecipeDataset(..., for_training=False)`.
    """
    return [
        {
            "id": record["id"],
            "source": record["source"],
            "images": record["images"],
            "messages": record["messages"][:1],
            "references": [record["messages"][1]["content"]],
        }
        for record in _read_conversations(jsonl_path, image_root, skip_log)
    ]


def jsonl_prediction_examples(jsonl_path, image_root) -> list[dict]:
    """Examples to answer (`common.outputs.predict`) from a conversations JSONL file (format: `load_jsonl_conversations`).

    Each line gives ``{"id", "source", "images", "messages": [the first user message], "references"}``: the
    first turn is answered, its ``assistant`` text is optional and, when given, is the one reference; later turns
    are ignored. The same checks as for training, with ``path:line`` in the message.
    """
    return _read_conversations(jsonl_path, image_root, answered=False)


def _read_conversations(jsonl_path, image_root, skip_log=None, answered: bool = True) -> list[dict]:
    path = Path(jsonl_path)
    if not path.is_file():
        raise FileNotFoundError(f"conversations JSONL {path} does not exist or is not a file")
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image root {root} is not a folder; pass the folder that {path.name}'s image paths are relative to "
            "(for convert_ucf101.py output: OUT_DIR/images)"
        )
    root = root.resolve()
    records: list[dict] = []
    line_of_id: dict[str, int] = {}
    size = path.stat().st_size
    with resolving_images(), open(path, "rb") as handle, tqdm(
        total=size, unit="B", unit_scale=True, desc=f"checking {path.name}", disable=size < PROGRESS_MIN_BYTES
    ) as progress:
        for line_number, raw in enumerate(handle, start=1):
            progress.update(len(raw))
            try:
                record = _parse_line(raw, f"{path}:{line_number}", root, line_of_id, answered)
            except (DataError, FileNotFoundError) as error:
                if skip_log is None:
                    raise
                skip_log.record(str(error), stage="validation")
                continue
            if record is not None:
                line_of_id[record["id"]] = line_number
                records.append(record)
    if not records:
        raise DataError(f"{path} holds no examples (no non-blank line); write one JSON object per line")
    return records


def _parse_line(raw: bytes, where: str, root: Path, line_of_id: dict[str, int], answered: bool = True) -> dict | None:
    """One line's example, None for a blank line; DataError/FileNotFoundError (naming `where`) if it is bad."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: not UTF-8 text ({error}); save the file as UTF-8") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{where}: invalid JSON ({error.msg} at column {error.colno}); every line must be one complete "
            "JSON object like {\"id\": ..., \"conversations\": [...]}"
        ) from None
    record = _parse_record(record, where, root, answered)
    if record["id"] in line_of_id:
        raise DataError(
            f"{where}: id {record['id']!r} is already used on line {line_of_id[record['id']]}; give every line its own id"
        )
    return record


def _parse_record(record, where: str, root: Path, answered: bool = True) -> dict:
    """The line's example; with ``answered=False`` only the first turn, whose ``assistant`` may be missing."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object {{...}}, got a JSON {type(record).__name__}")
    for key in ("id", "conversations"):
        if key not in record:
            raise DataError(f"{where}: missing key {key!r}; every line needs \"id\" and \"conversations\"")
    example_id, source, conversations = record["id"], record.get("source"), record["conversations"]
    if not isinstance(example_id, str) or not example_id:
        raise DataError(f"{where}: \"id\" must be a non-empty string, got {example_id!r:.100}")
    if source is not None and not isinstance(source, str):
        raise DataError(f"{where}: \"source\" must be a string when given, got {source!r:.100}")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(
            f"{where}: \"conversations\" must be a non-empty list of {{\"images\", \"user\", \"assistant\"}} turns"
        )

    if not answered:
        conversations = conversations[:1]
    images: list[str] = []
    messages: list[dict] = []
    for turn_index, turn in enumerate(conversations):
        turn_where = f"{where}: conversations[{turn_index}]"
        if not isinstance(turn, dict):
            raise DataError(f"{turn_where} must be an object with \"user\" and \"assistant\", got {turn!r:.100}")
        for key in ("user", "assistant"):
            if key not in turn and (answered or key == "user"):
                raise DataError(
                    f"{turn_where}: missing key {key!r}; every turn needs \"user\" and \"assistant\" strings"
                )
            if key in turn and not isinstance(turn[key], str):
                raise DataError(f"{turn_where}: {key!r} must be a string, got {turn[key]!r:.100}")
        turn_images = turn.get("images", [])
        if not isinstance(turn_images, list):
            raise DataError(f"{turn_where}: \"images\" must be a list of relative paths, got {turn_images!r:.100}")
        for image_index, relative in enumerate(turn_images):
            resolved = _resolve_image(relative, root, f"{turn_where}.images[{image_index}]")
            if resolved not in images:
                images.append(resolved)
        messages += [{"role": "user", "content": turn["user"]}, {"role": "assistant", "content": turn.get("assistant", "")}]

    if images and not IMAGE_TAG_PATTERN.search(messages[0]["content"]):
        tags = "".join(f"<|image_{k}|>" for k in range(1, len(images) + 1))
        messages[0]["content"] = f"{tags}\n{messages[0]['content']}"
    if not answered:
        reference = messages.pop()["content"]
    try:
        check_messages(messages, len(images), for_training=answered)
    except ExampleError as error:
        # check_messages counts messages, two per turn; the file counts turns.
        raise DataError(f"{where}: {error} (message 2t is conversations[t].user, 2t+1 its assistant)") from None
    example = {"id": example_id, "source": source, "images": images, "messages": messages}
    if not answered:
        example["references"] = [reference] if reference.strip() else []
    return example


# While a data file is read (`resolving_images`): the real path of each image folder met, so that each image
# costs one lstat instead of one per path component; the files of a folder are thousands.
_real_folders: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("real_folders", default=None)


@contextlib.contextmanager
def resolving_images():
    """Remember image folders' real paths for as long as one data file is read (see `_resolve_image`)."""
    token = _real_folders.set({})
    try:
        yield
    finally:
        _real_folders.reset(token)


def _real_path(path: str) -> tuple[str, os.stat_result | None]:
    """(the real path, the lstat of what it names or None if nothing is there), the folder's real path reused."""
    folders = _real_folders.get()
    parent, name = os.path.split(path)
    if folders is None or name in ("", ".", ".."):
        real = os.path.realpath(path)
        return real, _lstat(real)
    if parent not in folders:
        folders[parent] = os.path.realpath(parent)
    real = os.path.join(folders[parent], name)
    status = _lstat(real)
    if status is not None and stat.S_ISLNK(status.st_mode):
        real = os.path.realpath(real)
        status = _lstat(real)
    return real, status


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _resolve_image(relative, root: Path, where: str) -> str:
    if not isinstance(relative, str) or not relative:
        raise DataError(f"{where}: an image path must be a non-empty string, got {relative!r:.100}")
    if os.path.isabs(relative):
        raise DataError(
            f"{where}: image path {relative!r} is absolute; refused: image paths must be relative to the image root "
            f"{root}, so a data file can only point at files under it"
        )
    base = os.fspath(root)
    resolved, status = _real_path(os.path.join(base, relative))
    if resolved != base and not resolved.startswith(os.path.join(base, "")):
        raise DataError(
            f"{where}: image path {relative!r} leads to {resolved}, outside the image root {root} (through '..' or a "
            "symlink); refused. Put the images under the image root, or pass the image root they belong to."
        )
    if status is None or not stat.S_ISREG(status.st_mode):
        raise FileNotFoundError(f"{where}: image file {os.path.join(base, relative)} does not exist; add it or fix the path")
    return resolved
