"""What --torch_compile costs and gains on CPU: compile time, eager against compiled training-step time.

    python bench/bench_compile.py --threads 1 --sizes tiny wide --scopes layers model

Each size is a random-weight checkpoint written by `common.fixtures.tiny` (`tiny`: its default, 64 wide and 2 decoder
layers; `wide`: 256 wide, 4 layers) with its tiny CLIP tower. The batches come from the recipes' collator at
num_crops 4: pairs of examples with images of different sizes and crop counts, and text-only ones, so that
both the sequence length and the number of crops change from batch to batch, as in training. A step is a
training forward and backward with activation checkpointing, the recipes' default.

Scopes: `layers` is what --torch_compile does in the recipes (common/training/compile.py: each decoder and CLIP layer);
`model` is torch.compile of the whole model, which the Trainer would do, for comparison. Each scope runs the
batches twice on a fresh model: the first pass compiles (for every new shape until dynamic shapes take over),
so its time over the eager first pass is the compile cost; the second pass is timed per step. Graph breaks are
dynamo's count over both passes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo
from PIL import Image
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.data.collator import Phi3VCollator  # noqa: E402
from common.fixtures.tiny import build_tiny_checkpoint  # noqa: E402
from common.model.modeling_phi3v import Phi3VForCausalLM  # noqa: E402
from common.model.processing_phi3v import Phi3VProcessor  # noqa: E402
from common.training.compile import compile_layers  # noqa: E402

SIZES = {"tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4}, "wide": {"hidden_size": 256, "num_layers": 4, "num_heads": 8}}
NUM_CROPS = 4


def example(size: tuple[int, int] | None, answer: str) -> dict:
    if size is None:
        return {"messages": [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": answer}]}
    image = Image.new("RGB", size, (size[0] % 256, size[1] % 256, 120))
    return {"images": [image], "messages": [{"role": "user", "content": "<|image_1|>\nWhat is shown?"},
                                            {"role": "assistant", "content": answer}]}


# (width, height) of each example's image, None for text only: 2 to 5 crops, a tall and a wide page.
BATCHES = [
    [(500, 300), None], [(300, 300), (200, 400)], [None, None], [(900, 300), (300, 300)],
    [(300, 700), None], [(500, 500), (640, 480)],
]


def build_batches(processor) -> list[dict]:
    collate = Phi3VCollator(processor)
    return [collate([example(size, f"answer {i} {j}") for j, size in enumerate(sizes)]) for i, sizes in enumerate(BATCHES)]


def load(checkpoint: Path) -> Phi3VForCausalLM:
    torch.manual_seed(0)
    model = Phi3VForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.config.use_cache = False
    model.activation_checkpointing_enable({"use_reentrant": False})
    return model.train()


def timed_pass(model, batches) -> tuple[list[float], list[float]]:
    seconds, losses = [], []
    for batch in batches:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    return seconds, losses


def run(checkpoint: Path, batches, scope: str, backend: str) -> dict:
    model = load(checkpoint)
    torch._dynamo.reset()
    counters.clear()
    if scope == "layers":
        compile_layers(model, backend=backend)
    elif scope == "model":
        model.compile(backend=backend)
    first, losses = timed_pass(model, batches)
    second, _ = timed_pass(model, batches)
    return {
        "first_pass": sum(first),
        "step": statistics.median(second),
        "losses": losses,
        "breaks": sum(counters["graph_break"].values()),
        "graphs": counters["stats"]["unique_graphs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "wide"], choices=sorted(SIZES))
    parser.add_argument("--scopes", nargs="+", default=["layers"], choices=["layers", "model"])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.threads} torch thread(s), load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; "
          f"backend {args.backend}; {len(BATCHES)} batches of 2 examples at num_crops {NUM_CROPS}, activation checkpointing")
    print()
    print("| size | scope | compile time (s) | eager step (ms) | compiled step (ms) | speed-up | graphs | graph breaks | max loss difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            checkpoint = build_tiny_checkpoint(Path(folder) / size, **SIZES[size])
            batches = build_batches(Phi3VProcessor.from_pretrained(checkpoint, num_crops=NUM_CROPS))
            eager = run(checkpoint, batches, "eager", args.backend)
            for scope in args.scopes:
                result = run(checkpoint, batches, scope, args.backend)
                difference = max(abs(a - b) for a, b in zip(result["losses"], eager["losses"]))
                print(f"| {size} | {scope} | {result['first_pass'] - eager['first_pass']:.1f} | {eager['step'] * 1e3:.0f} | "
                      f"{result['step'] * 1e3:.0f} | {eager['step'] / result['step']:.2f}x | {result['graphs']} | "
                      f"{result['breaks']} | {difference:.1e} |", flush=True)
            print(f"load average after {size}: {os.getloadavg()[0]:.1f}", file=sys.stderr)


if __name__ == "__main__":
    main()
