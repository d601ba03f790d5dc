"""Images/s of the Phi-3.5-vision image processor (HD transform, normalisation, tiles) at num_crops 1, 4 and 16.

    python bench/bench_processor.py [--num_crops 1 4 16] [--seconds 60] [--threads 1]

Images are decoded PIL images of random pixels (decoding a file is not timed; the content does not change the
cost) in a mix of sizes: DocVQA-like pages from bench/_lengths.py, photos, a phone photo, a UCF-101 video
frame and a small image, and the shape of the per-core target: 12 pages of about 1200x1600 (at num_crops 16 one
thread should preprocess at least 25 of them per second on the 2-core CPU machine). Cells are timed round-robin,
one image each per round, so other jobs on the machine slow all cells alike; images per CPU-second (this
process's CPU time) are shown beside images per second, as they depend less on what else runs. One torch thread
by default, as in a DataLoader worker: the numbers are per worker.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _lengths import docvqa_like  # noqa: E402

from common.model.image_processing_phi3v import Phi3VImageProcessor  # noqa: E402

# (kind, [(width, height), ...]); the document pages are filled in from the DocVQA-like distribution.
FIXED_KINDS = [
    ("photo", [(1024, 768), (768, 1024), (640, 480)]),
    ("phone photo", [(4032, 3024)]),
    ("video frame", [(320, 240)]),
    ("small", [(224, 224)]),
]
DOCUMENT_PAGES = 4
TARGET_PAGES = "12 pages ~1200x1600"
TARGET_PAGES_PER_S = 25


def target_page_sizes(seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(1150, 1251)), int(rng.integers(1550, 1651))) for _ in range(12)]


def random_image(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    width, height = size
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def image_kinds(seed: int) -> list[tuple[str, list[tuple[int, int]]]]:
    pages = [example.page_size for example in docvqa_like(DOCUMENT_PAGES, seed=seed)]
    return [("document page", pages), (TARGET_PAGES, target_page_sizes(seed)), *FIXED_KINDS]


def sizes_text(images: list[Image.Image]) -> str:
    if len(images) <= 4:
        return ", ".join(f"{w}x{h}" for w, h in (image.size for image in images))
    widths, heights = zip(*(image.size for image in images))
    return f"{min(widths)}-{max(widths)} x {min(heights)}-{max(heights)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_crops", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=60.0, help="stop the timing rounds after this long")
    parser.add_argument("--min_rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (DataLoader workers use 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    kinds = [(kind, [random_image(size, rng) for size in sizes]) for kind, sizes in image_kinds(args.seed)]
    processor = Phi3VImageProcessor()
    cells = [(num_crops, kind, images) for num_crops in args.num_crops for kind, images in kinds]
    seconds = {(num_crops, kind): 0.0 for num_crops, kind, _ in cells}
    cpu_seconds = dict.fromkeys(seconds, 0.0)
    counts = dict.fromkeys(seconds, 0)
    tiles = dict.fromkeys(seconds, 0)
    output_bytes = dict.fromkeys(seconds, 0)

    for num_crops, _, images in cells:
        processor(images[0], num_crops=num_crops)
    load_before = os.getloadavg()
    started = time.perf_counter()
    rounds = 0
    while rounds < args.min_rounds or time.perf_counter() - started < args.seconds:
        for num_crops, kind, images in cells:
            image = images[rounds % len(images)]
            step_start, cpu_start = time.perf_counter(), time.process_time()
            features = processor(image, num_crops=num_crops)
            seconds[num_crops, kind] += time.perf_counter() - step_start
            cpu_seconds[num_crops, kind] += time.process_time() - cpu_start
            counts[num_crops, kind] += 1
            height, width = features["image_sizes"][0].tolist()
            tiles[num_crops, kind] += (height // 336) * (width // 336)
            output_bytes[num_crops, kind] += features["pixel_values"].nbytes
        rounds += 1
    load_after = os.getloadavg()

    sizes = {kind: sizes_text(images) for kind, images in kinds}
    # The target pages are a second sample of document pages; the mix keeps one of each other kind.
    mix_kinds = [kind for kind, _ in kinds if kind != TARGET_PAGES]
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: CPU "
        f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; {rounds} rounds",
        f"command: `{' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`",
        "",
        "| num_crops | images | sizes (w x h) | tiles/image | images/s | ms/image | images/CPU-s "
        "| pixel_values/image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for num_crops in args.num_crops:
        for kind, _ in kinds:
            key = (num_crops, kind)
            lines.append(
                f"| {num_crops} | {kind} | {sizes[kind]} | {tiles[key] / counts[key]:.1f} | "
                f"{counts[key] / seconds[key]:.1f} | {1000 * seconds[key] / counts[key]:.1f} | "
                f"{counts[key] / cpu_seconds[key]:.1f} | {output_bytes[key] / counts[key] / 1024**2:.1f} MiB |"
            )
        mix_count = sum(counts[num_crops, kind] for kind in mix_kinds)
        mix_seconds = sum(seconds[num_crops, kind] for kind in mix_kinds)
        mix_cpu_seconds = sum(cpu_seconds[num_crops, kind] for kind in mix_kinds)
        lines.append(
            f"| {num_crops} | **mix (one of each other kind)** | | | **{mix_count / mix_seconds:.1f}** | "
            f"{1000 * mix_seconds / mix_count:.1f} | {mix_count / mix_cpu_seconds:.1f} | |"
        )
    if 16 in args.num_crops and args.threads == 1:
        key = (16, TARGET_PAGES)
        lines += [
            "",
            f"target shape ({TARGET_PAGES}, num_crops 16, 1 thread): {counts[key] / seconds[key]:.1f} pages/s, "
            f"{counts[key] / cpu_seconds[key]:.1f} pages/CPU-s (target >= {TARGET_PAGES_PER_S} pages/s)",
        ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
