"""Speed of the validation pass before training, and of its image-decoding check, on threads or processes.

    python bench/bench_validation.py [--images 10000] [--pages 200] [--workers 1 2 4] [--rounds 3]

Writes two data sets into a temporary folder, one JSONL row per image: `--images` small synthetic images (48
to 320 px a side, smooth colours plus noise) and `--pages` document-like pages (1200 x 1600, black text on
white), each half JPEG, half PNG. It builds the tiny checkpoint for its tokenizer, then times, round-robin
(every configuration once per round, so other jobs on the machine slow all alike):

- the image check alone over every small image: a full decode, `check_image_decodes` on this thread, on a
  thread pool and on process pools (fork; and spawn, whose workers import `common` first, at the largest size
  only); pool start-up included;
- the whole validation pass (`validate_training_data`, tokenizing every row; num_crops 4 for the small images,
  16 for the pages) with the image checks on a pool of N threads (`image_check_pool(N)`, what the recipes use)
  or of N forked processes, against the pass without them (`RecipeDataset.scan` reading image headers only,
  which is what the pass did before it decoded images).

Files are read from the page cache (they were just written): the times are CPU, not disk. Prints markdown
tables with the medians over the rounds of the wall time, of the main thread's CPU time and of the CPU time of
all threads and worker processes together. On a machine busy with other work the wall time shows what was
left to the pass; the wall time cannot fall below the main thread's CPU time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.data.dataset import (  # noqa: E402
    RecipeDataset,
    check_image_decodes,
    image_check_pool,
    load_jsonl_conversations,
)
from common.data.validation import validate_training_data  # noqa: E402
from common.fixtures.tiny import build_tiny_checkpoint  # noqa: E402
from common.model.processing_phi3v import Phi3VProcessor  # noqa: E402

PROMPT = "What colour is the largest shape?"
# Files per task handed to a process pool by `pool.map`: enough to amortise the pickling of each task.
PROCESS_CHUNK = 64
HEADERS_ONLY = "image headers only (no decoding: the pass before this check)"


def small_image(rng: np.random.Generator) -> Image.Image:
    width, height = (int(side) for side in rng.integers(48, 321, size=2))
    rows, cols = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 256, 3)
    pixels = np.stack([(base[c] + rows * (c + 1) + cols * (3 - c)) % 256 for c in range(3)], axis=-1)
    pixels = pixels + rng.normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def document_page(rng: np.random.Generator) -> Image.Image:
    page = Image.new("RGB", (1200, 1600), "white")
    draw = ImageDraw.Draw(page)
    for _ in range(800):
        draw.text((int(rng.integers(0, 1100)), int(rng.integers(0, 1580))), "Invoice total 42.00 USD", fill="black")
    return page


def write_data(folder: Path, count: int, make_image, seed: int) -> tuple[list[dict], dict[str, list[int]]]:
    """Rows as `load_jsonl_conversations` reads them, and the file sizes per format."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True)
    lines, sizes = [], {"JPEG": [], "PNG": []}
    for index in range(count):
        file_format = "JPEG" if index % 2 == 0 else "PNG"
        name = f"{index:05d}.{'jpg' if file_format == 'JPEG' else 'png'}"
        make_image(rng).save(images / name, format=file_format, **({"quality": 90} if file_format == "JPEG" else {}))
        sizes[file_format].append((images / name).stat().st_size)
        turn = {"images": [name], "user": PROMPT, "assistant": ["red", "green", "blue"][index % 3]}
        lines.append(json.dumps({"id": f"row-{index:05d}", "conversations": [turn]}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return load_jsonl_conversations(folder / "train.jsonl", images), sizes


def full_decode(path) -> None:
    with Image.open(path) as image:
        image.load()


def serial(function, paths: list[str]) -> None:
    for path in paths:
        function(path)


def on_threads(workers: int, paths: list[str]) -> None:
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(check_image_decodes, paths):
            pass


def on_processes(workers: int, start_method: str, paths: list[str]) -> None:
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start_method)) as pool:
        for _ in pool.map(check_image_decodes, paths, chunksize=PROCESS_CHUNK):
            pass


def forked_processes(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))


def pass_configurations(rows: list[dict], processor, workers_list: list[int]) -> dict:
    def headers_only():
        for scanned in RecipeDataset(rows, name="bench").scan(processor):
            assert scanned.error is None, scanned.error

    def validation(pool):
        with pool:
            validate_training_data(RecipeDataset(rows, name="bench"), processor, 0, None, pool)

    passes = {HEADERS_ONLY: headers_only}
    for workers in workers_list:
        plural = "s" if workers > 1 else ""
        passes[f"image checks on {workers} thread{plural} (image_check_pool)"] = lambda w=workers: validation(image_check_pool(w))
        passes[f"image checks on {workers} forked process{'es' if plural else ''}"] = lambda w=workers: validation(forked_processes(w))
    return passes


def cpu_seconds() -> float:
    """CPU time of this process's threads and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run) -> tuple[float, float, float]:
    """(wall, main-thread CPU, all CPU) seconds of one run; pools are shut down inside it, so children count."""
    wall, main_cpu, all_cpu = time.perf_counter(), time.thread_time(), cpu_seconds()
    run()
    return time.perf_counter() - wall, time.thread_time() - main_cpu, cpu_seconds() - all_cpu


def describe(name: str, sizes: dict[str, list[int]], seconds: float) -> str:
    formats = "; ".join(f"{len(s)} {f}, mean {sum(s) / len(s) / 1024:.1f} KiB" for f, s in sizes.items() if s)
    return f"{name}: {formats}; written in {seconds:.0f} s"


def pass_table(title: str, count: int, names, median) -> list[str]:
    lines = [
        "",
        f"| {title} | wall s | rows/s | wall s more than headers only | main thread CPU s | all CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        wall, main_cpu, all_cpu = median[name]
        extra = "-" if name.endswith(HEADERS_ONLY) else f"{wall - median[names[0]][0]:+.2f}"
        lines.append(f"| {name.split(': ', 1)[1]} | {wall:.2f} | {count / wall:.0f} | {extra} | {main_cpu:.2f} | {all_cpu:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="threads / processes to try")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-validation-") as temporary:
        folder = Path(temporary)
        checkpoint = build_tiny_checkpoint(folder / "tiny")
        started = time.perf_counter()
        small_rows, small_sizes = write_data(folder / "small", args.images, small_image, args.seed)
        small_note = describe("small images, 48-320 px a side", small_sizes, time.perf_counter() - started)
        started = time.perf_counter()
        page_rows, page_sizes = write_data(folder / "pages", args.pages, document_page, args.seed)
        page_note = describe("document pages, 1200 x 1600", page_sizes, time.perf_counter() - started)
        paths = [row["images"][0] for row in small_rows]

        checks = {"full decode (Image.load), 1 thread": lambda: serial(full_decode, paths),
                  "check_image_decodes, 1 thread": lambda: serial(check_image_decodes, paths)}
        for workers in args.workers:
            checks[f"check_image_decodes, thread pool of {workers}"] = lambda w=workers: on_threads(w, paths)
        for workers in args.workers:
            checks[f"check_image_decodes, fork pool of {workers}"] = lambda w=workers: on_processes(w, "fork", paths)
        most = max(args.workers)
        checks[f"check_image_decodes, spawn pool of {most}"] = lambda: on_processes(most, "spawn", paths)
        runs = dict(checks)
        for prefix, rows, num_crops in (("small", small_rows, 4), ("pages", page_rows, 16)):
            processor = Phi3VProcessor.from_pretrained(checkpoint, num_crops=num_crops)
            for name, run in pass_configurations(rows, processor, args.workers).items():
                runs[f"{prefix}: {name}"] = run

        timings = {name: [] for name in runs}
        load_before = os.getloadavg()
        for _ in range(args.rounds):
            for name, run in runs.items():
                timings[name].append(timed(run))
        load_after = os.getloadavg()

    median = {name: [statistics.median(column) for column in zip(*rounds)] for name, rounds in timings.items()}
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: CPU {platform.machine()}, "
        f"{os.cpu_count()} cores; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
        f"{args.rounds} rounds, median shown",
        f"command: `{' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`",
        f"data: {small_note}. {page_note}",
        "",
        f"| image check over {len(paths)} small images | wall s | files/s | vs 1 thread | main thread CPU s | all CPU s |",
        "|---|---|---|---|---|---|",
    ]
    reference = median["check_image_decodes, 1 thread"][0]
    for name in checks:
        wall, main_cpu, all_cpu = median[name]
        lines.append(f"| {name} | {wall:.2f} | {len(paths) / wall:.0f} | {reference / wall:.2f}x | {main_cpu:.2f} | {all_cpu:.2f} |")
    for prefix, count, title in (("small", len(small_rows), f"validation pass, {len(small_rows)} small images, num_crops 4"),
                                 ("pages", len(page_rows), f"validation pass, {len(page_rows)} document pages, num_crops 16")):
        lines += pass_table(title, count, [name for name in runs if name.startswith(f"{prefix}: ")], median)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
