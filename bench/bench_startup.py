"""Start-up of a training run at LLaVA scale: time from launch to the first optimizer step, and peak RSS per rank.

    python bench/bench_startup.py [--rows 10000 100000 300000] [--ranks 1 2]

For each row count it writes a synthetic LLaVA file (one small image file per row, 32 to 64 px PNGs, one or
two turns, a few text-only rows) into a temporary folder, and a 16-row evaluation file. Then, for each rank
count, it launches `finetune_hf_trainer_custom.py` under torchrun on the tiny checkpoint (LoRA,
--train_sampling_strategy group_by_length, --skip_bad_examples, no DataLoader workers, no evaluation before or
after) twice into the same output folder:

- first start: an empty output folder; the run stops after its first optimizer step with a checkpoint;
- restart: `--resume_from_checkpoint latest`, as after a preemption; the parsed rows (common/data/row_store.py)
  and the validation findings (common/data/scan_cache.py) come from ``OUTPUT_DIR/data_scans/``.

Each rank reports, at the end of its first optimizer step, the seconds since the launch, the seconds its data
took (reading the file, the validation passes), and its peak RSS (ru_maxrss). The table gives the slowest
rank's time and the largest RSS; "per row" divides by the row count, and bytes per row is the RSS slope
between two row counts. Files are read from the page cache (they were just written).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "finetune_hf_trainer_custom.py"
# Distinct image bytes to write: enough variety that files differ, cheap enough for 300k files.
IMAGE_VARIANTS = 256


def image_variants(seed: int = 0) -> list[bytes]:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    variants = []
    for _ in range(IMAGE_VARIANTS):
        width, height = rng.randint(32, 64), rng.randint(32, 64)
        image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            x, y = rng.randrange(width), rng.randrange(height)
            draw.rectangle((x, y, x + rng.randint(4, 16), y + rng.randint(4, 16)), fill=tuple(rng.randrange(256) for _ in range(3)))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        variants.append(buffer.getvalue())
    return variants


def llava_row(index: int, images: list[str]) -> dict:
    if not images:
        a, b = index % 7, index % 5
        turns = [("human", f"What is {a} plus {b}?"), ("gpt", str(a + b))]
    elif index % 2:
        turns = [("human", "<image>\nHow many shapes are there?"), ("gpt", str(index % 4 + 1))]
    else:
        turns = [("human", "<image>\nWhat colour is the background?"), ("gpt", "a colour"),
                 ("human", "And how many shapes?"), ("gpt", str(index % 4 + 1))]
    row = {"id": f"row-{index:07d}", "conversations": [{"from": who, "value": text} for who, text in turns]}
    if images:
        row["image"] = images[0]
    return row


def write_data(folder: Path, rows: int) -> tuple[Path, Path]:
    """(train file, eval file) of LLaVA JSONL rows over image files in folder/images (every 20th row text-only)."""
    variants = image_variants()
    images = folder / "images"
    for shard in range(0, rows, 1000):
        (images / f"{shard // 1000:04d}").mkdir(parents=True, exist_ok=True)

    def lines(count: int, prefix: str):
        for index in range(count):
            names = []
            if index % 20 != 19:
                names = [f"images/{index // 1000:04d}/{prefix}{index:07d}.png"]
                (folder / names[0]).write_bytes(variants[index % IMAGE_VARIANTS])
            yield json.dumps(llava_row(index, names)) + "\n"

    train, evaluation = folder / "train.jsonl", folder / "eval.jsonl"
    with open(train, "w", encoding="utf-8") as handle:
        handle.writelines(lines(rows, "t"))
    with open(evaluation, "w", encoding="utf-8") as handle:
        handle.writelines(lines(16, "e"))
    return train, evaluation


# ------------------------------------------------------------------------------------------------------------
# The worker: runs the recipe, reports at its first optimizer step


def worker(report_dir: Path, launched: float) -> None:
    import runpy

    sys.path.insert(0, str(REPO_ROOT))
    from transformers import TrainerCallback

    import common.training.recipe

    data_seconds = [0.0]

    def timed(function):
        def wrapper(*args, **kwargs):
            start = time.time()
            try:
                return function(*args, **kwargs)
            finally:
                data_seconds[0] += time.time() - start

        return wrapper

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            report = {
                "seconds": time.time() - launched,
                "data_seconds": data_seconds[0],
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
            (report_dir / f"rank{args.process_index}-step{state.global_step}.json").write_text(json.dumps(report))
            control.should_save = True
            control.should_training_stop = True

    build_trainer = common.training.recipe.build_trainer

    def build_trainer_reporting(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.add_callback(FirstStep())
        return trainer

    import common.data.formats

    common.training.recipe.build_trainer = build_trainer_reporting
    common.training.recipe.check_training_data = timed(common.training.recipe.check_training_data)
    common.training.recipe.check_evaluation_data = timed(common.training.recipe.check_evaluation_data)
    common.data.formats.CustomData.__init__ = timed(common.data.formats.CustomData.__init__)
    runpy.run_path(str(REPO_ROOT / SCRIPT), run_name="__main__")


# ------------------------------------------------------------------------------------------------------------


def launch(checkpoint: Path, train: Path, evaluation: Path, out: Path, ranks: int, resume: bool, report_dir: Path) -> dict:
    report_dir.mkdir(parents=True, exist_ok=True)
    args = ["--model_name_or_path", checkpoint, "--train_file", train, "--eval_file", evaluation, "--output_dir", out,
            "--num_crops", "1", "--skip_bad_examples", "--train_sampling_strategy", "group_by_length", "--batch_size", "4",
            "--batch_size_per_gpu", str(4 // ranks), "--max_steps", "4", "--save_steps", "1000", "--use_lora", "--lora_rank", "4",
            "--metric", "none", "--skip_eval_before", "--skip_eval_after", "--ddp_backend", "gloo", "--dataloader_num_workers", "0",
            "--report_to", "none"]
    if resume:
        args += ["--resume_from_checkpoint", "latest"]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(out.parent / "hf_home"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", BENCH_STARTUP_REPORT=str(report_dir), BENCH_STARTUP_LAUNCHED=repr(time.time()))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", __file__, "--worker", *map(str, args)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    reports = [json.loads(path.read_text()) for path in sorted(report_dir.glob("rank*.json"))]
    if result.returncode != 0 or len(reports) != ranks:
        raise SystemExit(f"run failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    if resume and ("reused from" not in result.stderr or "rows opened from" not in result.stderr):
        raise SystemExit(f"the restart did not reuse the stored rows and the validation findings:\n{result.stderr[-4000:]}")
    return {
        "seconds": max(report["seconds"] for report in reports),
        "data_seconds": max(report["data_seconds"] for report in reports),
        "peak_rss": max(report["peak_rss"] for report in reports),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10000, 100000, 300000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    options = parser.parse_args()
    # The tiny checkpoint is made here, from nothing on the hub; offline, nothing waits on a lookup.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO_ROOT))
    from common.fixtures.tiny import build_tiny_checkpoint

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as temporary:
        root = Path(temporary)
        checkpoint = build_tiny_checkpoint(root / "tiny")
        for rows in options.rows:
            started = time.time()
            train, evaluation = write_data(root / f"data-{rows}", rows)
            print(f"wrote {rows} rows and their images in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
            for ranks in options.ranks:
                out = root / f"out-{rows}-{ranks}"
                for resume in (False, True):
                    load = os.getloadavg()[0]
                    measured = launch(checkpoint, train, evaluation, out, ranks, resume, root / f"reports-{rows}-{ranks}-{int(resume)}")
                    results.append({"rows": rows, "ranks": ranks, "start": "restart" if resume else "first", "load": load, **measured})
                    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print_table(results)


def print_table(results: list[dict]) -> None:
    load = os.getloadavg()
    print(f"{datetime.date.today()}, {platform.node()} ({os.cpu_count()} CPUs), load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print()
    print("| rows | ranks | start | launch to first step (s) | of which data (s) | ms per row | peak RSS per rank (MiB) | load at launch |")
    print("|---|---|---|---|---|---|---|---|")
    for entry in results:
        print(f"| {entry['rows']:,} | {entry['ranks']} | {entry['start']} | {entry['seconds']:.1f} | {entry['data_seconds']:.1f} | "
              f"{1000 * entry['seconds'] / entry['rows']:.3f} | {entry['peak_rss'] / 2**20:.0f} | {entry['load']:.1f} |")
    print()
    by = {(entry["rows"], entry["ranks"], entry["start"]): entry for entry in results}
    for rows in sorted({entry["rows"] for entry in results}):
        first_one, first_two = by.get((rows, 1, "first")), by.get((rows, 2, "first"))
        if first_one and first_two:
            print(f"- {rows:,} rows: 2-rank first start / 1-rank first start = {first_two['seconds'] / first_one['seconds']:.2f} "
                  f"(data phase {first_two['data_seconds'] / first_one['data_seconds']:.2f})")
        for ranks in sorted({entry["ranks"] for entry in results}):
            first, restart = by.get((rows, ranks, "first")), by.get((rows, ranks, "restart"))
            if first and restart:
                print(f"- {rows:,} rows, {ranks} rank(s): restart / first start = {restart['seconds'] / first['seconds']:.2f} "
                      f"(data phase {restart['data_seconds'] / first['data_seconds']:.2f})")
    counts = sorted({entry["rows"] for entry in results})
    for ranks in sorted({entry["ranks"] for entry in results}):
        for low, high in zip(counts, counts[1:]):
            small, large = by.get((low, ranks, "first")), by.get((high, ranks, "first"))
            if small and large:
                slope = (large["peak_rss"] - small["peak_rss"]) / (high - low)
                print(f"- {ranks} rank(s), first start: peak RSS grows by {slope:,.0f} bytes per row from {low:,} to {high:,} rows")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.argv = [SCRIPT, *sys.argv[2:]]
        worker(Path(os.environ["BENCH_STARTUP_REPORT"]), float(os.environ["BENCH_STARTUP_LAUNCHED"]))
    else:
        main()
