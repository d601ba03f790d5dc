"""The validation pass before training, and the record of skipped examples.

Every training row is converted and checked before the first step: message structure, image tags against
images, empty answers, image files that do not open or do not decode (a truncated JPEG, checked on a thread
pool, see `RecipeDataset.scan`), images of a mode that cannot become RGB, token length against
``--max_length``, and answers that leave no supervised token (nothing to learn). By default the first problem
stops the run with a message naming the row; with ``--skip_bad_examples`` every bad row is left out, logged
and counted, and so is any row that fails later, while its pixels are decoded.
``OUTPUT_DIR/skipped_examples.jsonl`` lists them all. The pass ends with the token-length distribution of the
rows kept and the id of the longest.
"""

from __future__ import annotations

import json
import logging
import math
from concurrent.futures import Executor
from pathlib import Path

from .conversation import DataError, ExampleError
from .data import RecipeDataset, ScannedRow, image_check_pool

logger = logging.getLogger(__name__)
SKIP_LOG_NAME = "skipped_examples.jsonl"


class SkipLog:
    """Appends one JSON line per skipped example; lines are short, so appends from DataLoader workers interleave whole."""

    def __init__(self, output_dir: str | Path, main_process: bool = True):
        self.path = Path(output_dir) / SKIP_LOG_NAME
        # Every rank runs the same validation pass; only the main process writes its findings once.
        self.main_process = main_process

    def reset(self) -> None:
        if self.main_process:
            self.path.unlink(missing_ok=True)

    def record(self, reason: str, stage: str) -> None:
        if stage == "validation" and not self.main_process:
            return
        logger.warning("skipping an example (%s): %s", stage, reason)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"stage": stage, "reason": reason}) + "\n")

    def count(self) -> int:
        if not self.path.is_file():
            return 0
        return sum(1 for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip())


def validate_training_data(
    dataset: RecipeDataset,
    processor,
    num_crops: int,
    max_length: int | None,
    skip_log: SkipLog | None,
    image_pool: Executor | None = None,
) -> RecipeDataset:
    """Check every row up front; without a skip log the first bad row raises, with one bad rows are dropped.

    `max_length` None or 0 allows any length. `image_pool` decodes the images (default: `image_check_pool()`,
    shut down at the end).
    """
    if len(dataset) == 0:
        raise DataError(f"{dataset.name} holds no rows, so there is nothing to train on; check the data path and --max_train_samples")
    keep: list[int] = []
    lengths: list[int] = []
    problems: list[ExampleError] = []
    longest: ScannedRow | None = None
    for scanned, error in _scan(dataset, processor, num_crops, image_pool, lambda row: _unusable(dataset, row, num_crops, max_length)):
        if error is not None:
            if skip_log is None:
                raise error
            problems.append(error)
            skip_log.record(str(error), stage="validation")
            continue
        keep.append(scanned.index)
        lengths.append(scanned.tokens.total)
        if longest is None or scanned.tokens.total > longest.tokens.total:
            longest = scanned
    if not keep:
        raise ExampleError(f"{dataset.name}: all {len(dataset)} rows are unusable; the first: {problems[0]}")
    if problems:
        logger.warning(
            "%s: %d of %d rows skipped before training (listed in %s)",
            dataset.name, len(problems), len(dataset), skip_log.path,
        )
        dataset = dataset.subset(keep)
    dataset.skip_log = skip_log
    logger.info("%s: %d rows checked, %d used for training", dataset.name, len(keep) + len(problems), len(keep))
    logger.info("%s", length_summary(dataset.name, lengths, longest.example_id, max_length))
    return dataset


def validate_evaluation_data(
    dataset: RecipeDataset, processor, num_crops: int, skip_log: SkipLog | None, image_pool: Executor | None = None
) -> RecipeDataset:
    """The same checks over an evaluation split, before training: a bad row stops the run now rather than after
    all of training. With a skip log bad rows are left out, and the returned dataset's ``skipped`` lists them
    (``{"index", "id", "reason"}``) for the evaluation files, whose score then counts the rest only."""
    if len(dataset) == 0:
        raise DataError(f"{dataset.name} holds no rows, so there is nothing to evaluate on; check the data path and --max_eval_samples")
    keep: list[int] = []
    skipped: list[dict] = []
    for scanned, error in _scan(dataset, processor, num_crops, image_pool, lambda row: None):
        if error is None:
            keep.append(scanned.index)
            continue
        if skip_log is None:
            raise error
        skip_log.record(str(error), stage="validation")
        skipped.append({"index": dataset.original_index(scanned.index), "id": scanned.example_id, "reason": str(error)})
    if not keep:
        raise ExampleError(f"{dataset.name}: all {len(dataset)} rows are unusable; the first: {skipped[0]['reason']}")
    if skipped:
        logger.warning("%s: %d of %d rows skipped before training; evaluations score the other %d", dataset.name, len(skipped), len(dataset), len(keep))
        dataset = dataset.subset(keep)
        dataset.skipped = skipped
    logger.info("%s: %d rows checked, %d used for evaluation", dataset.name, len(keep) + len(skipped), len(keep))
    return dataset


def _scan(dataset: RecipeDataset, processor, num_crops: int, image_pool: Executor | None, unusable):
    """(row, its ExampleError or None) for every row; `unusable(row)` adds the caller's own checks."""
    own_pool = image_check_pool() if image_pool is None else None
    try:
        for scanned in dataset.scan(processor, num_crops, image_pool or own_pool):
            yield scanned, scanned.error or unusable(scanned)
    finally:
        if own_pool is not None:
            # Stopping at a bad row must not wait for the checks still queued behind it.
            own_pool.shutdown(cancel_futures=True)


def length_summary(name: str, lengths: list[int], longest_id, max_length: int | None) -> str:
    """One line: min, median, p99 and max tokens per example (nearest-rank percentiles) and the longest's id."""
    ordered = sorted(lengths)

    def percentile(fraction: float) -> int:
        return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]

    limit = f"--max_length {max_length}" if max_length else "no --max_length limit"
    return (
        f"{name}: tokens per example: min {ordered[0]}, median {percentile(0.5)}, p99 {percentile(0.99)}, "
        f"max {ordered[-1]} (id {longest_id!r}); {limit}"
    )


def _unusable(dataset: RecipeDataset, scanned: ScannedRow, num_crops: int, max_length: int | None) -> ExampleError | None:
    where = f"{dataset.name} row {dataset.original_index(scanned.index)} (id {scanned.example_id!r})"
    if max_length and scanned.tokens.total > max_length:
        return ExampleError(
            f"{where} is {scanned.tokens.total} tokens long, more than --max_length {max_length}. Image tokens cannot "
            f"be cut: raise --max_length (0 turns the limit off) if the GPU has the memory, lower --num_crops (now "
            f"{num_crops}), or pass --skip_bad_examples to drop such rows."
        )
    if scanned.tokens.supervised == 0:
        return ExampleError(
            f"{where} has no supervised token: every label is masked, so there is nothing to learn from it (training "
            "on it gives loss 0). Check that its answers survive the to_example function and the chat template, or "
            "pass --skip_bad_examples to drop such rows."
        )
    return None
