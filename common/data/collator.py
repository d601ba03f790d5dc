"""Batching of examples (common/data/conversation.py) into model inputs, for training and for generation.

Both collators tokenize and preprocess images themselves, so they run in the DataLoader workers next to the
image decoding. :func:`example_tokens` gives the exact token length and number of supervised (labelled) tokens
of a training example from its text and image sizes alone, without touching pixels, for length-grouped
sampling and for the validation pass. Examples that fail in the training loader raise `LoadingError`, which
reaches the user as the same one line from a DataLoader worker as from the main process.
"""

from __future__ import annotations

import math
import os
import re
from typing import NamedTuple

import torch
from PIL import Image

from ..errors import ExampleError, error_reason
from ..model.image_processing_phi3v import TILE, best_scale, check_num_crops, num_image_tokens, upright_size
from ..model.processing_phi3v import Phi3VProcessor
from .conversation import (
    IGNORE_INDEX,
    EncodedExample,
    answer_suffix,
    check_messages,
    encode_conversation,
    encode_prompt,
    prompt_text,
    split_system,
)

__all__ = [
    "LoadingError",
    "Phi3VCollator",
    "Phi3VGenerationCollator",
    "TokenCounts",
    "example_length",
    "example_tokens",
    "hd_output_size",
    "image_size",
]


# How torch re-raises an exception from a DataLoader worker (or its pin-memory thread) in the main process:
# exc_type("Caught <name> in DataLoader worker process N.\nOriginal Traceback ...") with the worker's whole
# formatted traceback as the message (torch.utils.data._utils.ExceptionWrapper.reraise).
_REPORT_FROM_WORKER = re.compile(r"Caught \w+ in .+?\.\nOriginal Traceback")


class LoadingError(ExampleError):
    """An example that fails while the training loader reads, decodes or encodes it.

    Raised in a DataLoader worker, torch re-raises it in the main process as this same type with the worker's
    traceback as its message; the constructor takes the original one-line message back out of it (the
    traceback's last line), so the user sees the same line as when the error happens in the main process.
    """

    def __init__(self, message: str = ""):
        super().__init__(_message_from_worker_report(message, type(self)))


def _message_from_worker_report(message, error_type: type) -> str:
    if not isinstance(message, str) or not _REPORT_FROM_WORKER.match(message):
        return message
    prefix = f"{error_type.__module__}.{error_type.__qualname__}: "
    for line in reversed(message.splitlines()):
        if line.startswith(prefix):
            return line[len(prefix) :]
    return message


class TokenCounts(NamedTuple):
    """Token counts of one training example: all of them, and those with a label (what the loss learns from)."""

    total: int
    supervised: int


def hd_output_size(size: tuple[int, int], num_crops: int) -> tuple[int, int]:
    """(H, W) that `hd_transform` gives an image of `size` = (width, height), computed without pixels."""
    check_num_crops(num_crops)
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"an image size must be positive, got {width}x{height}")
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    # Same scale rule and rounding as hd_transform, so the token count cannot drift from the real one.
    new_w = best_scale(ratio, num_crops) * TILE
    new_h = max(1, int(new_w / ratio))
    padded_h = math.ceil(new_h / TILE) * TILE
    return (new_w, padded_h) if transposed else (padded_h, new_w)


def image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image, or of an image file as `load_image` turns it upright, reading only the file
    header."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                return upright_size(opened)
        except (OSError, Image.DecompressionBombError) as error:
            # PIL's header errors ("Truncated File Read") do not say which of an example's files failed.
            raise OSError(f"image file {image} does not open: {error_reason(error)}") from error
    raise ExampleError(f"an image must be a PIL image or a file path, got {type(image).__name__}")


def example_tokens(processor: Phi3VProcessor, example: dict) -> TokenCounts:
    """The token counts of `encode_conversation(processor, example)`, from text and image sizes only:
    its length, and how many of its labels are not IGNORE_INDEX (the answer tokens of every turn).

    Images may be PIL images (a lazily opened file is not decoded: only `.size` is read) or file paths.
    """
    images = example.get("images") or []
    messages = example.get("messages")
    # An evaluation example ends with the user message to answer: its tokens are a prompt, none supervised.
    prompt_only = isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict) and messages[-1].get("role") == "user"
    check_messages(messages, len(images), for_training=not prompt_only)
    system, turns = split_system(messages)
    tokens_per_tile = processor.image_processor.num_img_tokens
    num_crops = processor.image_processor.num_crops
    counts = [num_image_tokens(*hd_output_size(image_size(image), num_crops), tokens_per_tile) for image in images]
    total = supervised = 0
    for turn in range(0, len(turns), 2):
        prompt = prompt_text(processor, turns[turn]["content"], system if turn == 0 else None)
        total += len(processor.encode_with_images(prompt, counts if turn == 0 else []))
        if turn + 1 < len(turns):
            answer = len(answer_ids(processor, turns[turn + 1]["content"]))
            total += answer
            supervised += answer
    return TokenCounts(total, supervised)


def example_length(processor: Phi3VProcessor, example: dict) -> int:
    """Exact `len(encode_conversation(processor, example))`, from text and image sizes only."""
    return example_tokens(processor, example).total


def answer_ids(processor: Phi3VProcessor, content: str) -> list[int]:
    """The token ids an assistant message is trained on, as `encode_conversation` labels them."""
    return processor.tokenizer(content + answer_suffix(processor), add_special_tokens=False)["input_ids"]


def _describe(example, position: int) -> str:
    example_id = example.get("id") if isinstance(example, dict) else None
    if example_id is None:
        return f"example at batch position {position} (it has no 'id')"
    return f"example {example_id!r} (batch position {position})"


def _pad_id(processor: Phi3VProcessor) -> int:
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (Phi-3 uses <|endoftext|>)")
    return pad_id


def _image_inputs(encoded: list[EncodedExample]) -> dict[str, torch.Tensor]:
    with_images = [e for e in encoded if e.pixel_values is not None]
    if not with_images:
        return {}
    return {
        "pixel_values": torch.cat([e.pixel_values for e in with_images]),
        "image_sizes": torch.cat([e.image_sizes for e in with_images]),
    }


class Phi3VCollator:
    """Training collator: a list of training examples -> one batch of tensors for `Phi3VForCausalLM`.

    Input: training examples as defined in `common/data/conversation.py`, ``{"images": [PIL images],
    "messages": [system (optional), user, assistant, ...], "id": optional}``. Each is encoded with `encode_conversation` at
    the processor's ``num_crops`` (1..16), the one source of the crop count.

    Output (a dict; all integer tensors int64):

    - ``input_ids`` (B, L): token ids, right-padded with the tokenizer's pad id to the longest example
      (right padding keeps every example's positions 0..n-1, as in an unpadded forward). Image tag k of an
      example is a run of ``-k`` ids, one per image feature vector: the model treats every id < 0 as an
      image position and fills these positions, in order, with the features of ``pixel_values``.
    - ``attention_mask`` (B, L): 1 on tokens, 0 on padding.
    - ``labels`` (B, L): the answer ids of every assistant turn (``{answer}<|end|>\\n<|endoftext|>``) and
      -100 everywhere else: prompts, image positions and padding. The model shifts them by one itself.
    - ``pixel_values`` float32 (N, num_crops + 1, 3, 336, 336) and ``image_sizes`` (N, 2) as [H, W]: the N
      images of the whole batch, example by example, in each example's image order. Both keys are absent
      when no example of the batch has an image.

    ``padding_free=True`` packs the batch into one row instead of padding: ``input_ids`` and ``labels`` are
    (1, total) concatenations of the examples, each example's first label is -100 (nothing predicts across
    a boundary), ``position_ids`` (1, total) restart at 0 for every example, and there is no
    ``attention_mask`` key: transformers keeps packed examples apart with sdpa/eager only when the mask is
    None, no cache is used (the Trainer sets ``use_cache=False``; any other training loop must too) and
    position ids restart; flash attention takes its varlen path from the same position ids.
    ``pixel_values``/``image_sizes`` are as above. The loss equals the padded batch's loss.

    ``max_length``: image tokens cannot be cut and a cut answer teaches a wrong ending, so examples are
    never truncated: an example longer than ``max_length`` tokens raises `LoadingError` naming it and its
    length. Use `length_of` (exact, reads no pixels) to drop such examples before training. ``None`` or 0
    (``--max_length 0``) allows any length.

    Any example that cannot be encoded raises `LoadingError` (an `ExampleError`) naming its ``id`` (or batch
    position), as one line also from a DataLoader worker. With a
    ``skip_log`` (`common.data.validation.SkipLog`, from ``--skip_bad_examples``) such examples, and the ``None``
    items a `RecipeDataset` with a skip log yields for rows it could not read, are dropped from the batch and
    recorded instead; a batch left with no example still raises.
    """

    def __init__(
        self,
        processor: Phi3VProcessor,
        max_length: int | None = None,
        padding_free: bool = False,
        skip_log=None,
    ):
        valid_int = isinstance(max_length, int) and not isinstance(max_length, bool) and max_length >= 0
        if max_length is not None and not valid_int:
            raise ValueError(f"max_length must be a non-negative int (0 or None: no limit), got {max_length!r}")
        self.processor = processor
        self.max_length = max_length or None
        self.padding_free = bool(padding_free)
        self.pad_token_id = _pad_id(processor)
        self.skip_log = skip_log

    def length_of(self, example: dict) -> int:
        """The example's exact token length in a batch of this collator, computed without pixel data."""
        return example_length(self.processor, example)

    def encode(self, example: dict, position: int = 0) -> EncodedExample:
        """`encode_conversation` with errors that name the example, and the `max_length` check."""
        if not isinstance(example, dict):
            raise LoadingError(f"batch position {position} holds a {type(example).__name__}, not an example dict")
        try:
            encoded = encode_conversation(self.processor, example)
        except (ValueError, TypeError, OSError) as error:
            raise LoadingError(
                f"{_describe(example, position)} cannot be encoded: {error}. Fix the example (or the code that "
                "converts its row), or filter it out before training."
            ) from error
        if self.max_length is not None and len(encoded) > self.max_length:
            raise LoadingError(
                f"{_describe(example, position)} is {len(encoded)} tokens long, more than max_length="
                f"{self.max_length}; image tokens cannot be truncated. Raise max_length, lower num_crops "
                f"(now {self.processor.image_processor.num_crops}), or drop the examples whose length_of() exceeds max_length."
            )
        return encoded

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("the collator got an empty list of examples; a batch needs at least one")
        encoded = []
        for position, example in enumerate(examples):
            if example is None and self.skip_log is not None:
                continue
            try:
                encoded.append(self.encode(example, position))
            except ExampleError as error:
                if self.skip_log is None:
                    raise
                self.skip_log.record(str(error), stage="encoding")
        if not encoded:
            raise LoadingError(
                f"all {len(examples)} examples of this batch were skipped as unusable (see the warnings above); "
                "the data has too many bad rows to train on"
            )
        batch = self._pack(encoded) if self.padding_free else self._pad(encoded)
        batch.update(_image_inputs(encoded))
        return batch

    def _pad(self, encoded: list[EncodedExample]) -> dict[str, torch.Tensor]:
        width = max(len(e) for e in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            input_ids[row, : len(e)] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[row, : len(e)] = torch.tensor(e.labels, dtype=torch.long)
            attention_mask[row, : len(e)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _pack(self, encoded: list[EncodedExample]) -> dict[str, torch.Tensor]:
        input_ids, labels, position_ids = [], [], []
        for e in encoded:
            input_ids += e.input_ids
            # In one row, an example's last token would otherwise be trained to predict the next example's start.
            labels += [IGNORE_INDEX] + e.labels[1:]
            position_ids += range(len(e))
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
        }


class Phi3VGenerationCollator:
    """Evaluation collator: a list of evaluation examples -> ``(model_inputs, metadata)``.

    Input: evaluation examples (`common/data/conversation.py`), ``{"id", "images", "messages": [..., the user message
    to answer], "references": [str, ...]}``, each encoded with `encode_prompt` at the processor's `num_crops`, so
    every prompt ends with the generation prompt ``<|assistant|>\\n``.

    ``model_inputs`` (for ``model.generate(**model_inputs, ...)``): ``input_ids`` (B, L) int64, left-padded
    with the pad id so that every prompt ends in the last column and generated tokens start at column L;
    ``attention_mask`` (B, L) int64, 0 on the padding; ``pixel_values`` float32
    (N, num_crops + 1, 3, 336, 336) and ``image_sizes`` int64 (N, 2) for the batch's images in order, absent
    when no example has an image. Image positions are negative ids (see `Phi3VCollator`); the model's
    generation shows them to logits processors (e.g. ``repetition_penalty``) as ``<unk>``.

    ``metadata``: ``{"ids": [example ids], "references": [each example's reference list]}``, in batch order.
    """

    def __init__(self, processor: Phi3VProcessor):
        self.processor = processor
        self.pad_token_id = _pad_id(processor)

    def __call__(self, examples: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
        if not examples:
            raise ValueError("the generation collator got an empty list of examples; a batch needs at least one")
        encoded, ids, references = [], [], []
        for position, example in enumerate(examples):
            if not isinstance(example, dict):
                raise ExampleError(f"batch position {position} holds a {type(example).__name__}, not an example dict")
            try:
                encoded.append(encode_prompt(self.processor, example))
                example_references = example.get("references")
                if not isinstance(example_references, list) or not all(isinstance(r, str) for r in example_references):
                    raise ExampleError(f"'references' must be a list of strings, got {example_references!r:.200}")
            except (ValueError, TypeError, OSError) as error:
                raise ExampleError(
                    f"evaluation {_describe(example, position)} cannot be encoded: {error}. Fix the example or the "
                    "code that builds evaluation examples."
                ) from error
            ids.append(example.get("id"))
            references.append(example_references)

        width = max(len(e) for e in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            input_ids[row, width - len(e) :] = torch.tensor(e.input_ids, dtype=torch.long)
            attention_mask[row, width - len(e) :] = 1
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **_image_inputs(encoded)}
        return model_inputs, {"ids": ids, "references": references}
