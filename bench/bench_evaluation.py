"""Evaluation time with preprocessing in the main process (DataLoader workers 0) against workers that
preprocess the next batches while the model generates, next to preprocessing alone and generation alone (on
batches made beforehand): the demo's evaluation (48 videos of 8 frames, the demo's
tiny 128-wide checkpoint, num_crops 1, batches of 8, 8 new tokens) on CPU, and preprocessing alone.

    .venv/bin/python bench/bench_evaluation.py                 # prints a Markdown table
    .venv/bin/python bench/bench_evaluation.py --workers 0 1 2 --rounds 3

The data is made as the demo makes it (synthetic videos, then convert_ucf101.py) in a temporary folder;
rounds run the settings in turn, so load from other jobs slows each alike; the table gives the median.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from common.data.collator import Phi3VGenerationCollator  # noqa: E402
from common.data.dataset import RecipeDataset, jsonl_eval_examples  # noqa: E402
from common.evaluation.generation import AnswerGenerator, evaluate  # noqa: E402
from common.fixtures.tiny import build_tiny_checkpoint  # noqa: E402
from common.model.modeling_phi3v import Phi3VForCausalLM  # noqa: E402
from common.model.processing_phi3v import Phi3VProcessor  # noqa: E402


def make_demo_data(folder: Path, classes: int, videos_per_class: int) -> Path:
    videos, data = folder / "videos", folder / "ucf101"
    for command in (
        ["-m", "common.synthetic", "ucf101_videos", "--out", videos, "--classes", classes, "--videos_per_class", videos_per_class],
        ["convert_ucf101.py", "--video_dir", videos / "UCF101_subset", "--out_dir", data, "--num_frames", 8],
    ):
        subprocess.run([sys.executable, *map(str, command)], cwd=REPO_ROOT, check=True, capture_output=True)
    return data


def preprocessed_batches(processor, examples, batch_size: int) -> tuple[list[dict], float]:
    """Every batch read, decoded and preprocessed in this process, and the seconds that took."""
    collate = Phi3VGenerationCollator(processor)
    start = time.perf_counter()
    batches = [
        collate([examples[index] for index in range(first, min(first + batch_size, len(examples)))])[0]
        for first in range(0, len(examples), batch_size)
    ]
    return batches, time.perf_counter() - start


def generation_seconds(model, processor, batches: list[dict], max_new_tokens: int) -> float:
    answer = AnswerGenerator(model, processor, max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            answer.generate(batch)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--videos_per_class", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        checkpoint = build_tiny_checkpoint(folder / "tiny", hidden_size=128, num_layers=2, num_heads=4)
        data = make_demo_data(folder, args.classes, args.videos_per_class)
        processor = Phi3VProcessor.from_pretrained(checkpoint, num_crops=1)
        model = Phi3VForCausalLM.from_pretrained(checkpoint).eval()
        examples = RecipeDataset(jsonl_eval_examples(data / "ucf101_val.jsonl", data / "images"), name="val", for_training=False)

        timings: dict[str, list[float]] = {"preprocessing alone": [], "generation alone": []}
        timings |= {f"evaluate, {n} workers": [] for n in args.workers}
        for _ in range(args.rounds):
            batches, seconds = preprocessed_batches(processor, examples, args.batch_size)
            timings["preprocessing alone"].append(seconds)
            timings["generation alone"].append(generation_seconds(model, processor, batches, args.max_new_tokens))
            del batches
            for workers in args.workers:
                start = time.perf_counter()
                evaluate(model, processor, examples, "accuracy", folder / "eval.json", batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, desc="bench", num_workers=workers)
                timings[f"evaluate, {workers} workers"].append(time.perf_counter() - start)

    print(f"{len(examples)} videos x 8 frames, num_crops 1, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
          f"{args.threads} torch thread(s); {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; median of {args.rounds} rounds\n")
    print("| what | seconds (median) | all rounds |")
    print("|---|---|---|")
    for name, values in timings.items():
        print(f"| {name} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
    main()
