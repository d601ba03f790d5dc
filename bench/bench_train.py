"""Training-step throughput and peak memory of Phi-3.5-vision per training mode and batch policy.

    python bench/bench_train.py --model tiny --device cpu --threads 1 --num_crops 4 --loss_memory
    python bench/bench_train.py --model full-size --device cuda --modes full lora --loss_memory   (bench/gpu.sh)
    torchrun --nproc_per_node=N bench/bench_train.py --fsdp --model full-size --device cuda --modes full   (bench/gpu.sh)

Examples are synthetic token sequences with the DocVQA-like lengths of bench/_lengths.py (image placeholder
runs of the spec's length, random text ids, labels on the answer only) and random pixels, so neither the
processor nor data loading is timed. Models have random weights: `tiny` is the architecture `common.fixtures.tiny`
writes, `full-size` the published shapes (decoder 3072 x 32 layers, CLIP ViT-L/14-336), built directly on the
device; nothing is downloaded. Policies: `batch1` (the reference recipe: one example a step), `padded` (random
batches padded to their longest), `grouped` (batches cut from length-sorted megabatches, as HF's
LengthGroupedSampler does), `packed` (each batch one padding-free row, position ids restarting per example).
Every policy accumulates gradients and steps the optimizer (fused AdamW, the Trainer's default) once per
`--global_batch` examples, 64 as in the recipes and the reference, so batching is credited only with what it
really saves per example; the optimizer step is timed apart and charged at that rate.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` over the timed steps (weights, gradients, optimizer
state, activations). CPU has no allocator statistics, so there it is the bytes of parameters and optimizer
state plus the peak of the tensor storages allocated during one step of the timed set's largest batch,
counted by a TorchDispatchMode.

`--fsdp` (under torchrun) shards the model with `common.training.fsdp.shard_model`, the wrapping --fsdp gets through the
Trainer, with accelerate's precision rule: trainable weights in fp32 (the master copies), computed in --dtype.
Every rank trains on the same batches; rank 0 reports.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import os
import platform
import random
import shlex
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _lengths import (  # noqa: E402
    DOCVQA_MEAN_TOKENS,
    DOCVQA_NUM_CROPS,
    PAD_ID,
    POLICIES,
    Example,
    docvqa_like,
    padding_waste,
    plan_batches,
    processed_tokens,
    token_layout,
)

from common.fixtures.tiny import TINY_VISION, official_config_dict  # noqa: E402
from common.model.configuration_phi3v import CLIP_VIT_L_14_336, Phi3VConfig  # noqa: E402
from common.model.modeling_phi3v import ATTENTION_CHOICES, Phi3VForCausalLM  # noqa: E402

MODES = ("full", "frozen_vision", "lora", "qlora")
# hidden, layers, heads, intermediate, vision tower; "tiny" is common.fixtures.tiny's default checkpoint.
MODEL_SHAPES = {
    "tiny": (64, 2, 4, 128, TINY_VISION),
    "full-size": (3072, 32, 32, 8192, CLIP_VIT_L_14_336),
}
TILE = 336
GIB = 1024**3


class LiveTensorBytes(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while active.

    Only outputs that alias no input are new allocations; in-place and view results are skipped, so updating
    a parameter in place does not count it as new memory.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.biggest = 0
        self._sizes = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = out if isinstance(out, (tuple, list)) else (out,)
        for schema_return, value in zip(func._schema.returns, returns):
            if schema_return.alias_info is None:
                for tensor in tree_leaves(value):
                    if isinstance(tensor, torch.Tensor):
                        self._track(tensor.untyped_storage())
        return out

    def _track(self, storage) -> None:
        if storage in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        self.biggest = max(self.biggest, size)
        weakref.finalize(storage, self._release, size)

    def _release(self, size: int) -> None:
        self.live -= size


@dataclass
class Row:
    mode: str
    policy: str
    batch_size: int
    note: str = ""
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    optimizer_steps: int = 0
    optimizer_seconds: float = 0.0
    optimizer_cpu_seconds: float = 0.0
    real_tokens: int = 0
    processed: int = 0
    epoch_waste: float = 0.0
    peak_bytes: int = 0

    @property
    def micro_samples_per_s(self) -> float:
        """Forward+backward only, as if the optimizer step were free."""
        return self.samples / self.seconds

    def samples_per_s(self, global_batch: int, cpu: bool = False) -> float:
        """Samples/s with one optimizer step per `global_batch` examples (gradient accumulation in between)."""
        seconds, optimizer_seconds = (
            (self.cpu_seconds, self.optimizer_cpu_seconds) if cpu else (self.seconds, self.optimizer_seconds)
        )
        return global_batch / (global_batch * seconds / self.samples + optimizer_seconds / self.optimizer_steps)

    @property
    def waste(self) -> float:
        return 1 - self.real_tokens / self.processed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(args, mode: str, device: torch.device, dtype: torch.dtype):
    """A random-weight model set up for `mode` as the recipes do (common.training.model_setup), or a reason it cannot be."""
    if mode == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return None, "skipped: bitsandbytes not installed"
    hidden, layers, heads, intermediate, vision = MODEL_SHAPES[args.model]
    config_dict = official_config_dict(hidden, layers, heads, vision, args.seed)
    config_dict["intermediate_size"] = intermediate
    config = Phi3VConfig(**config_dict)
    torch.manual_seed(args.seed)
    # Built on the device itself: a full-size model initialises in seconds there, and nothing is downloaded.
    with torch.device(device):
        model = Phi3VForCausalLM._from_config(config, dtype=dtype, attn_implementation=args.attn)
    if mode == "qlora":
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            del model
            free_memory(device)
            model = load_quantized(folder, device, dtype, args.attn)
    model.config.use_cache = False
    if args.activation_checkpointing and not args.fsdp:
        checkpointing = {"use_reentrant": False}
        # transformers 5.24 renamed the method; the GPU machine's 5.17 has only the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    from common.training.model_setup import setup_training_mode

    model = setup_training_mode(model, mode, lora_rank=args.lora_rank, lora_alpha_ratio=2.0, lora_dropout=0.0, lora_vision=True)
    if args.fsdp:
        shard(model, args, dtype)
    if args.padding_mask == "keep":
        for module in model.modules():
            if isinstance(module, Phi3VForCausalLM):
                module.padding_mask_is_redundant = lambda attention_mask, cache: False
    model.train()
    return model, ""


def shard(model, args, dtype: torch.dtype) -> None:
    """FSDP2 as the Trainer's accelerate applies it under --fsdp: under mixed precision the trainable weights are
    upcast to fp32 and computed in `dtype`; checkpointing is FSDP's own, on the same layers."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from common.training.fsdp import shard_model

    policy = None
    if dtype != torch.float32:
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype, output_dtype=dtype)
    shard_model(model, activation_checkpointing=args.activation_checkpointing, mp_policy=policy)


def load_quantized(folder: str, device: torch.device, dtype: torch.dtype, attn: str):
    """The saved random weights reloaded in 4-bit nf4, as the recipes load a QLoRA base."""
    from common.training.model_setup import load_model

    return load_model(folder, dtype=dtype, attn_implementation=attn, device=device, qlora_compute_dtype=dtype)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_batch(examples: list[Example], policy: str, pixels: torch.Tensor, device: torch.device, rng) -> dict:
    """Model inputs in Phi3VCollator's layout: right padding with a mask, or one packed row without one."""
    layouts = [token_layout(example, rng) for example in examples]
    if policy == "packed":
        input_ids, labels, position_ids = [], [], []
        for ids, example_labels in layouts:
            input_ids += ids
            labels += [-100] + example_labels[1:]
            position_ids += range(len(ids))
        batch = {
            "input_ids": torch.tensor([input_ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([position_ids]),
        }
    else:
        width = max(len(ids) for ids, _ in layouts)
        batch = {
            "input_ids": torch.full((len(layouts), width), PAD_ID),
            "labels": torch.full((len(layouts), width), -100),
            "attention_mask": torch.zeros((len(layouts), width), dtype=torch.long),
        }
        for row, (ids, example_labels) in enumerate(layouts):
            batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
            batch["labels"][row, : len(ids)] = torch.tensor(example_labels)
            batch["attention_mask"][row, : len(ids)] = 1
    batch = {key: value.to(device) for key, value in batch.items()}
    # Pixel values do not change the cost: every example shares one random (crops, 3, 336, 336) tensor.
    batch["pixel_values"] = pixels.expand(len(examples), -1, -1, -1, -1)
    batch["image_sizes"] = torch.tensor([example.hd_size for example in examples], device=device)
    return batch


def forward_backward(model, batch: dict) -> None:
    model(**batch, use_cache=False).loss.backward()


def optimizer_step(optimizer) -> None:
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(model, optimizer, batch: dict) -> None:
    forward_backward(model, batch)
    optimizer_step(optimizer)


def static_bytes(model, optimizer) -> int:
    tensors = list(model.parameters()) + [
        value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)
    ]
    # A sharded (FSDP) tensor counts the shard this rank holds.
    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.untyped_storage().nbytes() for t in {id(t): t for t in tensors}.values())


@dataclass
class Prepared:
    row: Row
    lengths: list[int]
    warmup: list[dict]
    timed: list[tuple[dict, list[int]]]  # (batch, example indices), one step group per round


def examples_per_step(args, policy: str) -> int:
    return 1 if policy == "batch1" else args.batch_size


def prepare_row(args, mode: str, policy: str, pool: list[Example], pixels, device) -> Prepared:
    lengths = [example.length for example in pool]
    batch_size = examples_per_step(args, policy)
    plan = plan_batches(lengths, policy, batch_size, args.seed)
    row = Row(mode, policy, batch_size, epoch_waste=padding_waste(lengths, plan, policy))
    # Every policy gets the same number of examples per round: batch1 takes batch_size steps for one of the others.
    per_round = args.batch_size // batch_size
    chosen = random.Random(args.seed).sample(plan, (args.warmup + args.steps) * per_round)
    rng = random.Random(args.seed)
    batches = [(make_batch([pool[i] for i in indices], policy, pixels, device, rng), indices) for indices in chosen]
    split = args.warmup * per_round
    return Prepared(row, lengths, [batch for batch, _ in batches[:split]], batches[split:])


def time_rows(args, model, optimizer, prepared: list[Prepared], device) -> None:
    """Round-robin timing: each round runs one step group of every row, so a machine shared with other jobs
    (or a GPU warming up) slows all rows alike instead of whichever happened to run at the time."""
    for entry in prepared:
        for batch in entry.warmup:
            train_step(model, optimizer, batch)
    sync(device)
    started = time.perf_counter()
    for round_index in range(args.steps):
        rotation = round_index % len(prepared)
        for entry in prepared[rotation:] + prepared[:rotation]:
            row, per_round = entry.row, len(entry.timed) // args.steps
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step_start, cpu_start = time.perf_counter(), time.process_time()
            for batch, indices in entry.timed[round_index * per_round : (round_index + 1) * per_round]:
                forward_backward(model, batch)
                row.steps += 1
                row.samples += len(indices)
                batch_lengths = [entry.lengths[i] for i in indices]
                row.real_tokens += sum(batch_lengths)
                row.processed += processed_tokens(batch_lengths, row.policy)
            sync(device)
            row.seconds += time.perf_counter() - step_start
            row.cpu_seconds += time.process_time() - cpu_start
            # Timed apart: the recipes accumulate gradients and step once per global batch, whatever the policy.
            step_start, cpu_start = time.perf_counter(), time.process_time()
            optimizer_step(optimizer)
            sync(device)
            row.optimizer_steps += 1
            row.optimizer_seconds += time.perf_counter() - step_start
            row.optimizer_cpu_seconds += time.process_time() - cpu_start
            if device.type == "cuda":
                row.peak_bytes = max(row.peak_bytes, torch.cuda.max_memory_allocated(device))
        if time.perf_counter() - started > args.max_seconds:
            break
    if device.type == "cpu":
        for entry in prepared:
            done = entry.timed[: entry.row.steps]
            largest = max(done, key=lambda item: processed_tokens([entry.lengths[i] for i in item[1]], entry.row.policy))
            with LiveTensorBytes() as tracker:
                train_step(model, optimizer, largest[0])
            entry.row.peak_bytes = static_bytes(model, optimizer) + tracker.peak


def loss_memory_rows(args, model, mode: str, device) -> list[dict]:
    """Peak memory of one forward+backward at DocVQA length: answer-only loss vs full fp32 logits."""
    pool = docvqa_like(args.pool, DOCVQA_NUM_CROPS, args.seed)
    example = min(pool, key=lambda e: abs(e.length - DOCVQA_MEAN_TOKENS))
    pixels = torch.randn(1, DOCVQA_NUM_CROPS + 1, 3, TILE, TILE, device=device)
    batch = make_batch([example], "batch1", pixels, device, random.Random(args.seed))
    labels = batch.pop("labels")
    vocab = model.config.vocab_size

    def answer_positions():
        return model(**batch, labels=labels, use_cache=False).loss

    def full_logits():
        logits = model(**batch, use_cache=False).logits
        # The usual causal-LM loss: every position projected to the vocabulary, upcast to fp32, then shifted.
        return F.cross_entropy(logits.float()[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    rows = []
    for name, loss_fn in (("answer positions only (model loss)", answer_positions), ("full logits, fp32 CE", full_logits)):
        free_memory(device)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        with LiveTensorBytes() as tracker:
            loss_fn().backward()
        sync(device)
        model.zero_grad(set_to_none=True)
        rows.append(
            {
                "mode": mode,
                "loss": name,
                "tokens": example.length,
                "labelled": example.answer_tokens,
                "vocab": vocab,
                "biggest": tracker.biggest,
                "step_peak": tracker.peak,
                "cuda_peak_over_start": torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None,
            }
        )
    return rows


def fmt_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / GIB:.2f} GiB" if count >= GIB / 4 else f"{count / 1024**2:.1f} MiB"


def markdown(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def waste_table(args) -> str:
    rows = []
    for num_crops in sorted({DOCVQA_NUM_CROPS, args.num_crops}, reverse=True):
        lengths = [e.length for e in docvqa_like(args.pool, num_crops, args.seed)]
        for policy in POLICIES:
            plan = plan_batches(lengths, policy, examples_per_step(args, policy), args.seed)
            real = sum(lengths[i] for batch in plan for i in batch)
            processed = sum(processed_tokens([lengths[i] for i in batch], policy) for batch in plan)
            rows.append(
                [num_crops, f"{sum(lengths) / len(lengths):.0f}", policy, len(plan), real, processed,
                 f"{100 * padding_waste(lengths, plan, policy):.2f}%"]
            )
    headers = ["num_crops", "mean tokens", "policy", "batches", "real tokens", "processed tokens", "padding waste"]
    return markdown(headers, rows)


def throughput_table(rows: list[Row], device: torch.device, global_batch: int) -> str:
    batch1 = {row.mode: row for row in rows if row.policy == "batch1" and not row.note}
    on_cpu = device.type == "cpu"
    table = []
    for row in rows:
        if row.note:
            table.append([row.mode, row.policy, row.batch_size, row.note] + ["-"] * (9 + on_cpu))
            continue
        reference = batch1.get(row.mode)
        rate = row.samples_per_s(global_batch)
        speedup = f"{rate / reference.samples_per_s(global_batch):.2f}x" if reference else "-"
        # On a CPU shared with other jobs, samples per CPU-second of this process is the rate contention hurts least.
        cpu_rate = []
        if on_cpu:
            cpu = row.samples_per_s(global_batch, cpu=True)
            versus = f" ({cpu / reference.samples_per_s(global_batch, cpu=True):.2f}x)" if reference else ""
            cpu_rate = [f"{cpu:.2f}{versus}"]
        table.append(
            [row.mode, row.policy, row.batch_size, row.steps, f"{rate:.2f}", speedup, *cpu_rate,
             f"{row.micro_samples_per_s:.2f}", f"{1000 * row.optimizer_seconds / row.optimizer_steps:.0f}",
             f"{rate * row.real_tokens / row.samples:,.0f}", f"{100 * row.waste:.1f}%", f"{100 * row.epoch_waste:.1f}%",
             fmt_bytes(row.peak_bytes), f"{row.seconds + row.optimizer_seconds:.1f}"]
        )
    peak = "peak memory (static + step tensors)" if on_cpu else "peak memory (cuda max allocated)"
    headers = ["mode", "policy", "examples/micro-step", "micro-steps", f"samples/s = images/s (global batch {global_batch})",
               "vs batch1", *(["samples/CPU-s (vs batch1)"] if on_cpu else []), "samples/s, forward+backward only",
               "optimizer step ms", "real tokens/s", "pad waste (timed)", "pad waste (epoch)", peak, "timed s"]
    return markdown(headers, table)


def loss_table(rows: list[dict]) -> str:
    table = [
        [r["mode"], r["loss"], r["tokens"], r["labelled"], r["vocab"], fmt_bytes(r["biggest"]), fmt_bytes(r["step_peak"]),
         fmt_bytes(r["cuda_peak_over_start"])]
        for r in rows
    ]
    headers = ["mode", "loss", "sequence tokens", "labelled tokens", "vocab", "biggest tensor", "step peak (tensors)",
               "cuda peak over the step's start"]
    return markdown(headers, table)


def environment(device: torch.device) -> str:
    import transformers

    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)} ({torch.cuda.get_device_properties(device).total_memory / GIB:.0f} GiB)"
    else:
        machine = f"CPU {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, no GPU"
    # Other jobs on the machine slow every row; the load average says how busy it was.
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {machine}; "
        f"load average {load}; torch {torch.__version__}, transformers {transformers.__version__}"
    )


def report(args, device, rows: list[Row], loss_rows: list[dict], header: str) -> str:
    hidden, layers, heads, intermediate, vision = MODEL_SHAPES[args.model]
    parts = [
        header,
        f"command: `{' '.join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`",
        *([f"FSDP2 (common.training.fsdp.shard_model) over {torch.distributed.get_world_size()} processes, trainable weights "
           "fp32 computed in the dtype below, FSDP's activation checkpointing; per-rank rates and memory"] if args.fsdp else []),
        f"model: {args.model} random weights (decoder {hidden} x {layers} layers, vision {vision['hidden_size']} x "
        f"{vision['num_hidden_layers']} layers, vocab 32064), {args.dtype}, attention {args.attn} (padding mask: {args.padding_mask}), activation "
        f"checkpointing {'on' if args.activation_checkpointing else 'off'}, fused AdamW (the Trainer's default), LoRA rank {args.lora_rank}; lengths: DocVQA-like at "
        f"num_crops {args.num_crops} (mean {sum(e.length for e in docvqa_like(args.pool, args.num_crops, args.seed)) / args.pool:.0f} "
        f"tokens; {DOCVQA_MEAN_TOKENS} at num_crops {DOCVQA_NUM_CROPS}), one image per example",
        "",
        "Padding waste = pad tokens / processed tokens, over one epoch of the pool's batches (lengths only):",
        "",
        waste_table(args),
    ]
    if rows:
        parts += [
            "",
            f"Training steps (one optimizer step per {args.global_batch} examples, gradients accumulated over the "
            "micro-steps in between, as the recipes and the reference do):",
            "",
            throughput_table(rows, device, args.global_batch),
        ]
    if loss_rows:
        parts += ["", "Loss memory, one forward+backward of one DocVQA-length example:", "", loss_table(loss_rows)]
    return "\n".join(parts) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["full"])
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--batch_size", type=int, default=8, help="examples per micro-step of the batched policies")
    parser.add_argument(
        "--global_batch", type=int, default=64,
        help="examples per optimizer step (the recipes' and the reference's --batch_size); rates include its cost",
    )
    parser.add_argument("--num_crops", type=int, default=DOCVQA_NUM_CROPS, help="tiles per image (1..16)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--attn", choices=ATTENTION_CHOICES, default="sdpa")
    parser.add_argument("--activation_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--padding_mask", choices=("auto", "keep"), default="auto",
        help="auto: the model drops a right-padded batch's redundant mask under sdpa/eager; keep: always pass it "
        "(the cost of a masked kernel, for comparison)",
    )
    parser.add_argument("--lora_rank", type=int, default=64, help="the scripts' default")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing (see --steps)")
    parser.add_argument(
        "--steps", type=int, default=3,
        help="timed rounds; a round is one step of batch_size examples per policy (batch_size steps for batch1)",
    )
    parser.add_argument("--max_seconds", type=float, default=120.0, help="end a mode's timed rounds after this long")
    parser.add_argument("--budget_seconds", type=float, help="skip the modes not started after this long")
    parser.add_argument("--pool", type=int, default=2000, help="examples the epochs are planned over")
    parser.add_argument("--loss_memory", action="store_true", help="also compare the loss's peak memory")
    parser.add_argument("--out", type=Path, help="also write the tables (markdown) to this file after every row")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fsdp", action="store_true",
        help="shard the model as --fsdp does through the Trainer (FSDP2); run under torchrun; full and frozen_vision only",
    )
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.pool < (args.warmup + args.steps) * args.batch_size:
        parser.error("--pool must hold at least (warmup + steps) x batch_size examples")
    if args.global_batch % args.batch_size:
        parser.error("--global_batch must be a multiple of --batch_size (gradient accumulation steps are whole)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU; use --device cpu --model tiny for a dry run")
    if args.fsdp and "LOCAL_RANK" not in os.environ:
        parser.error("--fsdp runs under torchrun: torchrun --nproc_per_node=N bench/bench_train.py --fsdp ...")
    if args.fsdp and not set(args.modes) <= {"full", "frozen_vision"}:
        parser.error("--fsdp benchmarks full and frozen_vision only: the recipes refuse it with LoRA and QLoRA")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    device = torch.device(args.device)
    main_process = True
    if args.fsdp:
        torch.distributed.init_process_group("nccl" if args.device == "cuda" else "gloo")
        main_process = torch.distributed.get_rank() == 0
        if args.device == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    header = environment(device)
    pool = docvqa_like(args.pool, args.num_crops, args.seed)
    pixels = torch.randn(1, args.num_crops + 1, 3, TILE, TILE, device=device)
    rows: list[Row] = []
    loss_rows: list[dict] = []

    def publish():
        if args.out and main_process:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(report(args, device, rows, loss_rows, header))

    if not main_process:
        # The other ranks only train alongside rank 0, which reports.
        sys.stdout = open(os.devnull, "w")
    print(header, flush=True)
    for mode in args.modes:
        if args.budget_seconds is not None and time.perf_counter() - started > args.budget_seconds:
            rows += [Row(mode, p, examples_per_step(args, p), note="skipped: time budget spent") for p in args.policies]
            continue
        model, note = build_model(args, mode, device, dtype)
        if model is None:
            rows += [Row(mode, policy, examples_per_step(args, policy), note=note) for policy in args.policies]
            print(f"{mode}: {note}", flush=True)
            publish()
            continue
        trainable = [p for p in model.parameters() if p.requires_grad]
        # The Trainer's default optim (adamw_torch_fused from torch 2.8) on CPU and GPU alike.
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
        prepared = [prepare_row(args, mode, policy, pool, pixels, device) for policy in args.policies]
        time_rows(args, model, optimizer, prepared, device)
        for row in (entry.row for entry in prepared):
            rows.append(row)
            print(
                f"{mode:>13} {row.policy:>7}: {row.samples_per_s(args.global_batch):8.2f} samples/s "
                f"({row.micro_samples_per_s:.2f} forward+backward only), waste {100 * row.waste:4.1f}%, "
                f"peak {fmt_bytes(row.peak_bytes)}",
                flush=True,
            )
        del prepared
        publish()
        if args.loss_memory and not loss_rows:
            loss_rows = loss_memory_rows(args, model, mode, device)
            publish()
        del model, optimizer, trainable
        free_memory(device)
    print()
    print(report(args, device, rows, loss_rows, header), end="")
    publish()
    if args.fsdp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
