"""The validation pass before training, and the record of skipped examples.

Every training row is converted and checked before the first step: message structure, image tags against
images, empty answers, image files that do not open or do not decode (a truncated JPEG, checked on a thread
pool, see `RecipeDataset.scan`), images of a mode that cannot become RGB, token length against
``--max_length``, and answers that leave no supervised token (nothing to learn). By default the first problem
stops the run with a message naming the row; with ``--skip_bad_examples`` every bad row is left out, logged
and counted, and so is any row that fails later, while its pixels are decoded.
``OUTPUT_DIR/skipped_examples.jsonl`` lists them all. The pass ends with the token-length distribution of the
rows kept and the id of the longest.

The pass is done once per job: each rank checks its share of consecutive rows and the findings are gathered,
so every rank decides the same and the first bad row named is the one a single process would name. The
recipes keep the findings in the run folder (`common.data.scan_cache`), where a resume or a restart finds them.
"""

from __future__ import annotations

import json
import logging
import math
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from ..errors import DataError, ExampleError
from ..ranks import from_main, gathered, is_main_process, rank_and_world
from .collator import LoadingError, TokenCounts
from .dataset import RecipeDataset, image_check_pool
from .scan_cache import RowScan, ScanCache, scan_key

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
    max_length: int | None,
    skip_log: SkipLog | None,
    image_pool: Executor | None = None,
    cache: ScanCache | None = None,
) -> RecipeDataset:
    """Check every row up front; without a skip log the first bad row raises, with one bad rows are dropped.

    `max_length` None or 0 allows any length. `image_pool` decodes the images (default: `image_check_pool()`,
    shut down at the end). The rows are shared out over the ranks and the findings gathered (`checked_rows`);
    with a `cache` they are recorded there, and read back instead of checking again. The returned dataset
    remembers the token lengths of its rows for length-grouped batching.
    """
    if len(dataset) == 0:
        raise DataError(f"{dataset.name} holds no rows, so there is nothing to train on; check the data path and --max_train_samples")

    def unusable(tokens: TokenCounts) -> bool:
        return bool(max_length and tokens.total > max_length) or tokens.supervised == 0

    scan = checked_rows(dataset, processor, image_pool, cache, stop_at=unusable if skip_log is None else None)
    rows = scan.scanned
    bad = scan.total[:rows] < 0
    if max_length:
        bad |= scan.total[:rows] > max_length
    bad |= scan.supervised[:rows] == 0
    problems = np.flatnonzero(bad)
    if problems.size and skip_log is None:
        raise _problem(dataset, scan, int(problems[0]), processor, max_length)
    first_problem = None
    for index in problems.tolist():
        error = _problem(dataset, scan, index, processor, max_length)
        first_problem = first_problem or error
        skip_log.record(str(error), stage="validation")
    keep = np.flatnonzero(~bad)
    if not keep.size:
        raise ExampleError(f"{dataset.name}: all {len(dataset)} rows are unusable; the first: {first_problem}")
    if problems.size:
        logger.warning(
            "%s: %d of %d rows skipped before training (listed in %s)",
            dataset.name, problems.size, len(dataset), skip_log.path,
        )
        dataset = dataset.subset(keep.tolist())
    lengths = scan.total[keep]
    dataset.remember_lengths(processor, lengths)
    dataset.skip_log = skip_log
    logger.info("%s: %d rows checked, %d used for training", dataset.name, len(keep) + problems.size, len(keep))
    longest = int(np.argmax(lengths))
    logger.info("%s", length_summary(dataset.name, lengths, dataset.example_id(longest), max_length))
    return dataset


def validate_evaluation_data(
    dataset: RecipeDataset,
    processor,
    skip_log: SkipLog | None,
    image_pool: Executor | None = None,
    cache: ScanCache | None = None,
) -> RecipeDataset:
    """The same checks over an evaluation split, before training: a bad row stops the run now rather than after
    all of training. With a skip log bad rows are left out, and the returned dataset's ``skipped`` lists them
    (``{"index", "id", "reason"}``) for the evaluation files, whose score then counts the rest only. Shared
    out over the ranks and recorded in `cache` as `validate_training_data` does."""
    if len(dataset) == 0:
        raise DataError(f"{dataset.name} holds no rows, so there is nothing to evaluate on; check the data path and --max_eval_samples")
    scan = checked_rows(dataset, processor, image_pool, cache, stop_at=(lambda tokens: False) if skip_log is None else None)
    failed = sorted(scan.errors)
    if failed and skip_log is None:
        raise _problem(dataset, scan, failed[0], processor, None)
    skipped: list[dict] = []
    for index in failed:
        row_id, _, reason = scan.errors[index]
        skip_log.record(reason, stage="validation")
        skipped.append({"index": dataset.original_index(index), "id": row_id, "reason": reason})
    kept = len(dataset) - len(skipped)
    if not kept:
        raise ExampleError(f"{dataset.name}: all {len(dataset)} rows are unusable; the first: {skipped[0]['reason']}")
    if skipped:
        logger.warning("%s: %d of %d rows skipped before training; evaluations score the other %d", dataset.name, len(skipped), len(dataset), kept)
        dataset = dataset.subset([index for index in range(len(dataset)) if index not in scan.errors])
        dataset.skipped = skipped
    logger.info("%s: %d rows checked, %d used for evaluation", dataset.name, kept + len(skipped), kept)
    return dataset


def checked_rows(
    dataset: RecipeDataset, processor, image_pool: Executor | None, cache: ScanCache | None, stop_at=None
) -> RowScan:
    """What the checks find in every row, on every rank: read from `cache` when it holds this data's record
    (`common.data.scan_cache`), else each rank checks its share of consecutive rows and the shares are gathered.

    `stop_at(tokens)` given: a rank stops at its first row that fails or that `stop_at` calls unusable (the
    run is about to stop at the first bad row; the rows after a rank's first one cannot come before it).
    """
    key = None
    if cache is not None:
        if is_main_process():
            key = scan_key(dataset, processor, cache.contents.get(id(dataset)))
        recorded = from_main(cache.load(dataset.name, key, len(dataset)) if key else None)
        if recorded is not None:
            logger.info("%s: validation results of %d rows reused from %s (recorded by an earlier start on the same data and settings)",
                        dataset.name, len(dataset), cache.path(dataset.name))
            return recorded
    rank, world = rank_and_world()
    share = range(len(dataset) * rank // world, len(dataset) * (rank + 1) // world)
    scan = RowScan.joined(gathered(_scan_share(dataset, processor, image_pool, share, stop_at)))
    if world > 1:
        logger.info("%s: rows checked in %d processes, %d to %d rows each", dataset.name, world, len(dataset) // world, -(-len(dataset) // world))
    if key is not None and scan.complete:
        cache.save(dataset.name, key, scan)
    return scan


def _scan_share(dataset: RecipeDataset, processor, image_pool: Executor | None, share: range, stop_at) -> RowScan:
    part = RowScan.empty(len(share))
    for scanned in _scan(dataset, processor, image_pool, share):
        offset = scanned.index - share.start
        part.scanned = offset + 1
        if scanned.error is not None:
            kind = "LoadingError" if isinstance(scanned.error, LoadingError) else "ExampleError"
            part.errors[offset] = (scanned.example_id, kind, str(scanned.error))
            if stop_at is not None:
                break
            continue
        part.total[offset], part.supervised[offset] = scanned.tokens
        if stop_at is not None and stop_at(scanned.tokens):
            break
    return part


def _scan(dataset: RecipeDataset, processor, image_pool: Executor | None, rows: range):
    """Each row of `rows` as `RecipeDataset.scan` finds it, its images checked on `image_pool` or a pool of our own."""
    own_pool = image_check_pool() if image_pool is None else None
    try:
        yield from dataset.scan(processor, image_pool or own_pool, rows)
    finally:
        if own_pool is not None:
            # Stopping at a bad row must not wait for the checks still queued behind it.
            own_pool.shutdown(cancel_futures=True)


def length_summary(name: str, lengths: list[int], longest_id, max_length: int | None) -> str:
    """One line: min, median, p99 and max tokens per example (nearest-rank percentiles) and the longest's id."""
    ordered = np.sort(np.asarray(lengths)).tolist()

    def percentile(fraction: float) -> int:
        return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]

    limit = f"--max_length {max_length}" if max_length else "no --max_length limit"
    return (
        f"{name}: tokens per example: min {ordered[0]}, median {percentile(0.5)}, p99 {percentile(0.99)}, "
        f"max {ordered[-1]} (id {longest_id!r}); {limit}"
    )


def _problem(dataset: RecipeDataset, scan: RowScan, index: int, processor, max_length: int | None) -> ExampleError:
    """The error that makes row `index` unusable: the one its check raised, or its length or its labels."""
    if index in scan.errors:
        _, kind, reason = scan.errors[index]
        return (LoadingError if kind == "LoadingError" else ExampleError)(reason)
    where = f"{dataset.name} row {dataset.original_index(index)} (id {dataset.example_id(index)!r})"
    total = int(scan.total[index])
    if max_length and total > max_length:
        return ExampleError(
            f"{where} is {total} tokens long, more than --max_length {max_length}. Image tokens cannot "
            f"be cut: raise --max_length (0 turns the limit off) if the GPU has the memory, lower --num_crops (now "
            f"{processor.image_processor.num_crops}), or pass --skip_bad_examples to drop such rows."
        )
    return ExampleError(
        f"{where} has no supervised token: every label is masked, so there is nothing to learn from it (training "
        "on it gives loss 0). Check that its answers survive the to_example function and the chat template, or "
        "pass --skip_bad_examples to drop such rows."
    )
