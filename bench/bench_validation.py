"""Speed of the validation pass before training, and of its image-decoding check, on threads or processes.

    python bench/bench_validation.py [--images 10000] [--workers 1 2 4] [--rounds 3]

Writes `--images` small synthetic images (48 to 320 px a side, smooth colours plus noise; half JPEG, half PNG)
and one JSONL row per image into a temporary folder, builds the tiny checkpoint for its tokenizer, then
times, round-robin (every configuration once per round, so other jobs on the machine slow all alike):

- the image check alone over every file: a full decode, `check_image_decodes` on this thread, on a thread
  pool and on process pools (fork; and spawn, whose workers import `common` first, at the largest size
  only); pool start-up included;
- the whole validation pass (`validate_training_data` at num_crops 4, tokenizing every row) with the image
  checks on a pool of N threads or N forked processes (`image_check_pool(N)`, the default), against the pass
  without them (`RecipeDataset.scan` reading image headers only, which is what the pass did before).

Files are read from the page cache (they were just written): the times are CPU, not disk. Prints markdown
tables with the medians over the rounds of the wall time, of the main thread's CPU time and of the CPU time of
all threads and worker processes together. On a machine busy with other work the wall time shows what was
left to the pass; the CPU columns show what a parallel pool could overlap on idle cores: the wall time cannot
fall below the main thread's CPU time.
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
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.data import RecipeDataset, check_image_decodes, image_check_pool, load_jsonl_conversations  # noqa: E402
from common.processing_phi3v import Phi3VProcessor  # noqa: E402
from common.tiny import build_tiny_checkpoint  # noqa: E402
from common.validation import validate_training_data  # noqa: E402

NUM_CROPS = 4
PROMPT = "What colour is the largest shape?"
# Files per task handed to a process pool: enough to amortise the pickling of each task.
PROCESS_CHUNK = 64


def synthetic_image(rng: np.random.Generator) -> Image.Image:
    width, height = (int(side) for side in rng.integers(48, 321, size=2))
    rows, cols = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 256, 3)
    pixels = np.stack([(base[c] + rows * (c + 1) + cols * (3 - c)) % 256 for c in range(3)], axis=-1)
    pixels = pixels + rng.normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_data(folder: Path, count: int, seed: int) -> tuple[Path, Path, dict[str, int]]:
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True)
    lines, sizes = [], {"JPEG": 0, "PNG": 0}
    for index in range(count):
        file_format = "JPEG" if index % 2 == 0 else "PNG"
        name = f"{index:05d}.{'jpg' if file_format == 'JPEG' else 'png'}"
        synthetic_image(rng).save(images / name, format=file_format, **({"quality": 90} if file_format == "JPEG" else {}))
        sizes[file_format] += (images / name).stat().st_size
        turn = {"images": [name], "user": PROMPT, "assistant": ["red", "green", "blue"][index % 3]}
        lines.append(json.dumps({"id": f"row-{index:05d}", "conversations": [turn]}))
    jsonl = folder / "train.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl, images, sizes


def full_decode(path: Path) -> None:
    with Image.open(path) as image:
        image.load()


def serial(function, paths: list[Path]) -> None:
    for path in paths:
        function(path)


def on_threads(workers: int, paths: list[Path]) -> None:
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(check_image_decodes, paths):
            pass


def on_processes(workers: int, start_method: str, paths: list[Path]) -> None:
    context = multiprocessing.get_context(start_method)
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for _ in pool.map(check_image_decodes, paths, chunksize=PROCESS_CHUNK):
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="threads / processes to try")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-validation-") as temporary:
        folder = Path(temporary)
        started = time.perf_counter()
        jsonl, image_root, file_bytes = write_data(folder, args.images, args.seed)
        write_seconds = time.perf_counter() - started
        processor = Phi3VProcessor.from_pretrained(build_tiny_checkpoint(folder / "tiny"))
        rows = load_jsonl_conversations(jsonl, image_root)
        paths = [Path(row["images"][0]) for row in rows]

        checks = {"full decode (Image.load), 1 thread": lambda: serial(full_decode, paths),
                  "check_image_decodes, 1 thread": lambda: serial(check_image_decodes, paths)}
        for workers in args.workers:
            checks[f"check_image_decodes, thread pool of {workers}"] = lambda w=workers: on_threads(w, paths)
        for workers in args.workers:
            checks[f"check_image_decodes, {workers} processes (fork)"] = lambda w=workers: on_processes(w, "fork", paths)
        most = max(args.workers)
        checks[f"check_image_decodes, {most} processes (spawn)"] = lambda: on_processes(most, "spawn", paths)

        def headers_only():
            for scanned in RecipeDataset(rows, name="bench").scan(processor, NUM_CROPS):
                assert scanned.error is None, scanned.error

        baseline_name = "image headers only (no decoding: the pass before this check)"

        def validation(pool):
            with pool:
                validate_training_data(RecipeDataset(rows, name="bench"), processor, NUM_CROPS, 8192, None, pool)

        passes = {baseline_name: headers_only}
        for workers in args.workers:
            passes[f"image checks on a pool of {workers} threads"] = lambda w=workers: validation(ThreadPoolExecutor(w))
            passes[f"image checks on {workers} forked processes"] = lambda w=workers: validation(image_check_pool(w))

        timings = {name: [] for name in [*checks, *passes]}
        load_before = os.getloadavg()
        for _ in range(args.rounds):
            for name, run in [*checks.items(), *passes.items()]:
                timings[name].append(timed(run))
        load_after = os.getloadavg()

    median = {name: [statistics.median(column) for column in zip(*rounds)] for name, rounds in timings.items()}
    count = len(paths)
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: CPU {platform.machine()}, "
        f"{os.cpu_count()} cores; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
        f"{args.rounds} rounds, median shown",
        f"command: `{' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`",
        f"data: {count} images ({count - count // 2} JPEG, mean {file_bytes['JPEG'] / max(1, count - count // 2) / 1024:.1f} KiB; "
        f"{count // 2} PNG, mean {file_bytes['PNG'] / max(1, count // 2) / 1024:.1f} KiB), 48-320 px a side, "
        f"written in {write_seconds:.0f} s; one row per image",
        "",
        "| image check over every file | wall s | files/s | vs 1 thread | main thread CPU s | all CPU s |",
        "|---|---|---|---|---|---|",
    ]
    reference = median["check_image_decodes, 1 thread"][0]
    for name in checks:
        wall, main_cpu, all_cpu = median[name]
        lines.append(f"| {name} | {wall:.2f} | {count / wall:.0f} | {reference / wall:.2f}x | {main_cpu:.2f} | {all_cpu:.2f} |")
    lines += [
        "",
        f"| validation pass over {count} rows, num_crops {NUM_CROPS} | wall s | rows/s | wall s more than headers only "
        "| main thread CPU s | all CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for name in passes:
        wall, main_cpu, all_cpu = median[name]
        extra = "-" if name == baseline_name else f"{wall - median[baseline_name][0]:+.2f}"
        lines.append(f"| {name} | {wall:.2f} | {count / wall:.0f} | {extra} | {main_cpu:.2f} | {all_cpu:.2f} |")
    print("\n".join(lines))


def cpu_seconds() -> float:
    """CPU time of this process's threads and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run) -> tuple[float, float, float]:
    """(wall, main-thread CPU, all CPU) seconds of one run; pools are shut down inside it, so children count."""
    wall, main_cpu, all_cpu = time.perf_counter(), time.thread_time(), cpu_seconds()
    run()
    return time.perf_counter() - wall, time.thread_time() - main_cpu, cpu_seconds() - all_cpu


if __name__ == "__main__":
    main()
