"""The validation pass before training, and the record of skipped examples.

Every training row is converted and checked before the first step (message structure, image tags against
images, empty answers, image files that do not open, token length against ``--max_length``) without decoding
pixels. By default the first problem stops the run with a message naming the row; with
``--skip_bad_examples`` every bad row is left out, logged and counted, and so is any row that fails later,
while its pixels are decoded. ``OUTPUT_DIR/skipped_examples.jsonl`` lists them all.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .conversation import ExampleError
from .data import RecipeDataset

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
    dataset: RecipeDataset, processor, num_crops: int, max_length: int | None, skip_log: SkipLog | None
) -> RecipeDataset:
    """Check every row up front; without a skip log the first bad row raises, with one bad rows are dropped."""
    keep, problems = [], []
    for index, length in dataset.scan(processor, num_crops):
        if isinstance(length, int) and max_length is not None and length > max_length:
            length = ExampleError(
                f"{dataset.name} row {dataset.original_index(index)} is {length} tokens long, more than --max_length "
                f"{max_length}. Image tokens cannot be cut: raise --max_length, lower --num_crops (now {num_crops}), "
                "or pass --skip_bad_examples to drop such rows."
            )
        if isinstance(length, ExampleError):
            if skip_log is None:
                raise length
            problems.append(length)
            skip_log.record(str(length), stage="validation")
        else:
            keep.append(index)
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
    return dataset
