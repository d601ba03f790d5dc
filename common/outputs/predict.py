r"""Run a fine-tuned Phi-3.5-vision (full, merged, or base + LoRA adapter) on new inputs.

One prompt, printing the answer::

    python -m common.predict --model ./output/docvqa-full --image scan.png --prompt "What is the date? Answer briefly."
    python -m common.predict --model ./output/nlvr2-lora --image left.jpg right.jpg --prompt "Is there a dog in both images?"

Batch mode, one JSON line per example in input order: a conversations file in any format the custom recipe
reads (`common/data/formats.py`: LLaVA, chat messages, the recipes' JSONL; ``--format`` or detected; a conversation
that ends with a user message has that message answered with the turns before it as context, otherwise the
first turn is answered and its answer, if any, is kept as the reference) or a folder of images, each with the
same ``--prompt``. ``--system_prompt`` sets the system turn of every example that has none. Batched, sharded over
the ranks under torchrun, with a progress bar; killed and started again with the same command, it goes on where
it stopped, if the model's files (their SHA-256) are the same; on SIGTERM or SIGUSR1 it writes the batch it is
answering and exits with `PREEMPTED_EXIT_CODE` (75)::

    python -m common.predict --model ./output/ucf101-full --jsonl ./data/ucf101/ucf101_test.jsonl \
        --image_root ./data/ucf101/images --output ./predictions/ucf101_test.jsonl
    torchrun --nproc_per_node=8 -m common.predict --model ./output/docvqa-full --image_dir ./scans \
        --prompt "What is the invoice number? Answer briefly." --output ./predictions/scans.jsonl

``--model`` may also be a LoRA run's output (its adapter_config.json names the base), or a base checkpoint
with ``--adapter``. Prompts are built, and answers stop, exactly as in the recipes' evaluation
(`common.evaluation.generation.AnswerGenerator`); images are preprocessed with the ``num_crops`` the run trained with
(the output's preprocessor_config.json) unless ``--num_crops`` says otherwise. Image tags
(``<|image_1|>`` ...) are put in front of a prompt that has none.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub.errors import HFValidationError
from PIL import Image
from safetensors import SafetensorError
from tqdm import tqdm

from ..data.dataset import load_image
from ..data.formats import FILE_FORMATS, prediction_examples, with_system
from ..errors import DataError, ExportError, error_reason
from ..evaluation.generation import AnswerGenerator
from ..io import follow_umask, replace_atomically
from ..model.modeling_phi3v import Phi3VForCausalLM
from ..model.official_files import BaseCheckpoint
from ..model.official_format import with_adapter
from ..model.processing_phi3v import Phi3VProcessor
from ..training.preemption import PREEMPTED_EXIT_CODE, RECORD_ENV, STOP_SIGNALS
from ..training.run_folder import file_sha256
from .export import adapter_base, check_weight_files, write_failure

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PredictError(ValueError):
    """A bad input to predict; the message names it and says what to do."""


def with_image_tags(prompt: str, num_images: int) -> str:
    if num_images and "<|image_" not in prompt:
        return "".join(f"<|image_{k}|>" for k in range(1, num_images + 1)) + "\n" + prompt
    return prompt


def prompt_example(example_id: str, images: list[str], prompt: str, references: list[str] | None = None, system_prompt: str | None = None) -> dict:
    return {
        "id": example_id,
        "images": list(images),
        "messages": with_system([{"role": "user", "content": with_image_tags(prompt, len(images))}], system_prompt),
        "references": list(references or []),
    }


def check_image_file(path: Path) -> None:
    """Header check for every input before any model loads; pixels are decoded batch by batch."""
    if not path.is_file():
        raise PredictError(f"image {path} does not exist; fix the path")
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - reading the header is the check
    except (OSError, Image.DecompressionBombError) as error:
        raise PredictError(f"image {path} is not a readable image ({error_reason(error)}); replace or remove it") from None


def folder_examples(image_dir: Path, prompt: str, system_prompt: str | None = None) -> list[dict]:
    if not image_dir.is_dir():
        raise PredictError(f"--image_dir {image_dir} does not exist or is not a folder")
    paths = sorted(p for p in image_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise PredictError(f"--image_dir {image_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [prompt_example(str(p.relative_to(image_dir)), [str(p)], prompt, system_prompt=system_prompt) for p in paths]


def build_examples(args) -> list[dict]:
    if args.jsonl:
        jsonl = Path(args.jsonl)
        image_root = Path(args.image_root) if args.image_root else jsonl.parent
        examples = prediction_examples(jsonl, image_root, args.format, args.system_prompt)
        if not examples:
            raise PredictError(f"--jsonl {jsonl} holds no examples; give a file with one conversation per line")
        return examples
    if args.prompt is None:
        raise PredictError("--prompt is needed with --image and --image_dir")
    if args.image_dir:
        return folder_examples(Path(args.image_dir), args.prompt, args.system_prompt)
    return [prompt_example("prompt", args.image, args.prompt, system_prompt=args.system_prompt)]


def resolve_model(model: str, adapter: str | None) -> tuple[str, str | None]:
    """(base model, adapter or None); a LoRA run's output given as --model brings its own base."""
    path = Path(model)
    if not path.exists() and (path.is_absolute() or model.startswith(".")):
        raise PredictError(f"--model {model} does not exist; pass a run's output folder, a checkpoint folder or a hub id")
    if adapter is None and (path / "adapter_config.json").is_file():
        remedy = f"pass the checkpoint it was trained on as --model, with --adapter {model}"
        return adapter_base(path, None, remedy), model
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise PredictError(f"--adapter {adapter} has no adapter_config.json; pass a LoRA run's output folder")
    if adapter is None and path.is_dir() and not (path / "config.json").is_file():
        raise PredictError(f"--model {model} has neither config.json nor adapter_config.json; pass a run's output folder")
    return model, adapter


def model_content(base: str, adapter: str | None) -> dict[str, str]:
    """SHA-256 of the weight and config files of the base and the adapter: what predictions are of, wherever the
    folders lie and whatever they are called. A hub id stands for itself (its files arrive only as it loads)."""
    content = {}
    for role, source in (("model", base), ("adapter", adapter)):
        if source is None:
            continue
        if not Path(source).is_dir():
            content[role] = source
            continue
        files = [*sorted(Path(source).glob("*.safetensors")), Path(source) / "config.json", Path(source) / "adapter_config.json"]
        content.update({f"{role}/{path.name}": file_sha256(path) for path in files if path.is_file()})
    return content


def check_max_new_tokens(args) -> None:
    """--max_new_tokens must leave room in the model's context (max_position_embeddings) for the prompt."""
    base, _ = resolve_model(args.model, args.adapter)
    context = BaseCheckpoint(base).json("config.json").get("max_position_embeddings")
    if context and args.max_new_tokens >= context:
        raise PredictError(
            f"--max_new_tokens {args.max_new_tokens} does not fit the model's context of {context} tokens "
            f"(max_position_embeddings in {base}'s config.json), which also holds the prompt and its image tokens; "
            f"pass fewer, at most {context - 1}"
        )


def load(args, device: torch.device):
    base, adapter = resolve_model(args.model, args.adapter)
    for folder in (base, adapter):
        if folder is not None:
            check_weight_files(Path(folder))
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32)
    try:
        # The run's own processor files carry the num_crops it trained with.
        processor = Phi3VProcessor.from_pretrained(adapter or base, num_crops=args.num_crops)
        model = Phi3VForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation=args.attn_implementation, use_safetensors=True)
        if adapter is not None:
            model = with_adapter(model, adapter, lambda reason: PredictError(
                f"the adapter {adapter} does not fit the model {base} ({reason}); pass the checkpoint it was trained "
                f"on as --model, with --adapter {adapter}"
            ))
    except (OSError, SafetensorError, HFValidationError) as error:
        raise PredictError(f"could not load the model {base}{f' with adapter {adapter}' if adapter else ''}: {error_reason(error)}") from error
    return model.to(device).eval(), processor


def open_images(example: dict) -> dict:
    images = []
    for path in example["images"]:
        try:
            images.append(load_image(path))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise PredictError(
                f"example {example['id']!r}: image {path} does not decode ({error_reason(error)}); replace or remove it, "
                "then run the same command again to go on"
            ) from None
    return {**example, "images": images}


class PredictionLog:
    """Per-rank JSONL files under ``OUTPUT.parts/`` while the run goes on, merged into OUTPUT at the end.

    Every rank appends whole lines to its own file and flushes them after each batch, so a killed run leaves
    at most one cut-off line per file; a restart reads what every earlier rank wrote (whatever the world size
    was), drops the cut-off lines and predicts only the rest. ``run.json`` records what the predictions are of,
    so a restart with another model, prompt or input does not mix its answers into them.
    """

    def __init__(self, output: Path, identity: dict):
        self.output = output
        self.parts = output.with_name(output.name + ".parts")
        self.identity = identity

    def prepare(self, overwrite: bool) -> None:
        """On the main rank: check the output and any earlier attempt; start or continue the parts folder."""
        if self.output.exists() and not overwrite:
            raise PredictError(f"--output {self.output} already exists; choose another file, or pass --overwrite to replace it")
        record = self.parts / "run.json"
        if record.is_file():
            earlier = json.loads(record.read_text(encoding="utf-8"))
            changed = sorted(key for key in set(earlier) | set(self.identity) if earlier.get(key) != self.identity.get(key))
            if changed and not overwrite:
                raise PredictError(
                    f"{self.parts} holds predictions of another run ({', '.join(changed)} differ); use another --output, "
                    "or pass --overwrite to start afresh"
                )
            if changed:
                shutil.rmtree(self.parts)
        elif self.parts.exists():
            raise PredictError(f"{self.parts} exists but was not written by predict (no run.json); move it away")
        self.parts.mkdir(parents=True, exist_ok=True)
        if not record.is_file():
            record.write_text(json.dumps(self.identity, indent=2) + "\n", encoding="utf-8")
            follow_umask(record)

    def done(self) -> dict[str, dict]:
        records = {}
        for path in sorted(self.parts.glob("rank*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
                if line.endswith("\n"):
                    record = json.loads(line)
                    records[record["id"]] = record
        return records

    def open_for(self, rank: int):
        path = self.parts / f"rank{rank}.jsonl"
        if path.is_file():
            # Drop a line cut off by a kill; everything before it is whole.
            content = path.read_bytes()
            keep = content.rfind(b"\n") + 1
            if keep != len(content):
                with open(path, "r+b") as handle:
                    handle.truncate(keep)
        handle = open(path, "a", encoding="utf-8")
        follow_umask(path)
        return handle

    def merge(self, examples: list[dict]) -> int:
        records = self.done()
        missing = [example["id"] for example in examples if example["id"] not in records]
        if missing:
            raise RuntimeError(f"{len(missing)} examples have no prediction (first: {missing[0]!r}); run the same command again")

        def write(path: Path) -> None:
            with open(path, "w", encoding="utf-8") as handle:
                for example in examples:
                    handle.write(json.dumps(records[example["id"]], ensure_ascii=False) + "\n")

        self.output.parent.mkdir(parents=True, exist_ok=True)
        try:
            replace_atomically(self.output, write)
        except OSError as error:
            raise PredictError(
                f"{write_failure(self.output, error)}; all {len(examples)} predictions are kept in {self.parts}: make "
                "room, then run the same command again to write it"
            ) from None
        shutil.rmtree(self.parts)
        return len(examples)


def distributed() -> tuple[int, int, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size, device


def all_ranks_ok(ok: bool) -> bool:
    """Whether every rank got this far without an error, so a bad input on one rank stops all of them."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return int(flag.item()) == 0


class StopRequest:
    """SIGTERM/SIGUSR1 while predicting: noted, so that the batch being answered is written before the stop."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def _note(self, signum, frame):
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def any_rank_stops(signum: int) -> bool:
    if not dist.is_initialized():
        return bool(signum)
    flag = torch.tensor([1 if signum else 0])
    dist.all_reduce(flag)
    return bool(flag.item())


def stop_preempted(signum: int, log: PredictionLog, total: int, rank: int, world_size: int) -> None:
    """Keep what was written and exit with PREEMPTED_EXIT_CODE, as training does on the same signals; local rank 0
    leaves the message where `python -m common.launch` looks, so that the launcher exits with that code too."""
    if dist.is_initialized():
        dist.barrier()
    name = signal.Signals(signum).name if signum else "a stop signal to another rank"
    message = (f"stopped by {name}: {len(log.done())} of {total} predictions are kept in {log.parts}; run the same "
               f"command to go on (exit code {PREEMPTED_EXIT_CODE})")
    record = os.environ.get(RECORD_ENV)
    if record and os.environ.get("LOCAL_RANK", "0") == "0":
        Path(record).write_text(message + "\n", encoding="utf-8")
    if rank == 0:
        print(message, file=sys.stderr, flush=True)
    raise SystemExit(PREEMPTED_EXIT_CODE)


def predict_shard(args, remaining: list[dict], answer, log: PredictionLog, stop: StopRequest, total: int, rank: int,
                  world_size: int) -> None:
    """Answer this rank's share of `remaining` batch by batch, each batch written and flushed before the next;
    every rank goes through as many rounds as the largest share has batches, so that the stop vote before each
    round has every rank in it."""
    shard = remaining[rank::world_size]
    rounds = -(-len(remaining[0::world_size]) // args.batch_size)
    with log.open_for(rank) as handle, torch.no_grad():
        progress = tqdm(total=len(remaining), initial=0, desc="predict", unit="example", disable=rank != 0)
        for start in range(0, rounds * args.batch_size, args.batch_size):
            if any_rank_stops(stop.signum):
                progress.close()
                stop_preempted(stop.signum, log, total, rank, world_size)
            inputs = shard[start : start + args.batch_size]
            if not inputs:
                continue
            for example, prediction in zip(inputs, answer([open_images(example) for example in inputs])):
                record = {"id": example["id"], "prediction": prediction, "images": example["images"]}
                if example["references"]:
                    record["references"] = example["references"]
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            # Rank 0 shows the whole run's pace: its shard is 1/world of the remaining examples.
            progress.update(len(inputs) * (world_size if rank == 0 else 1))
        progress.close()


def predict_batch(args, examples: list[dict], rank: int, world_size: int, device: torch.device) -> int:
    output = Path(args.output)
    identity = {
        "model": model_content(*resolve_model(args.model, args.adapter)) if rank == 0 else {},
        "inputs": str(Path(args.jsonl or args.image_dir).resolve()),
        "prompt": args.prompt,
        "system_prompt": args.system_prompt,
        "num_crops": args.num_crops,
        "max_new_tokens": args.max_new_tokens,
        "dtype": args.dtype,
    }
    log = PredictionLog(output, identity)
    error = None
    if rank == 0:
        try:
            log.prepare(args.overwrite)
        except PredictError as raised:
            error = raised
    if not all_ranks_ok(error is None):
        raise error or PredictError(f"rank 0 could not prepare {output}; see its message")
    done = log.done()
    remaining = [example for example in examples if example["id"] not in done]
    if rank == 0 and done:
        logger.info("going on from an earlier run: %d of %d examples already predicted", len(done), len(examples))
    with StopRequest() as stop:
        model, processor = load(args, device)
        answer = AnswerGenerator(model, processor, args.max_new_tokens)
        predict_shard(args, remaining, answer, log, stop, len(examples), rank, world_size)
    if dist.is_initialized():
        dist.barrier()
    written = log.merge(examples) if rank == 0 else len(examples)
    if rank == 0:
        logger.info("wrote %d predictions to %s", written, output)
    return written


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m common.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a run's output, merged or checkpoint folder, a LoRA run's output, or a base checkpoint")
    parser.add_argument("--adapter", help="a LoRA run's output folder, applied on --model")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", nargs="+", help="image file(s) for one prompt; the answer is printed")
    inputs.add_argument("--jsonl", help="conversations file: LLaVA, chat messages or the recipes' JSONL (JSON array or JSONL)")
    inputs.add_argument("--image_dir", help="a folder of images (searched recursively), each answered with --prompt")
    parser.add_argument("--prompt", help="the question, for --image and --image_dir")
    parser.add_argument("--format", default="auto", choices=("auto", *FILE_FORMATS), help="format of --jsonl (default: detected)")
    parser.add_argument("--system_prompt", help="system turn for every example that has none")
    parser.add_argument("--image_root", help="folder the --jsonl image paths are relative to (default: the file's folder)")
    parser.add_argument("--output", help="JSONL file to write in batch mode (--jsonl, --image_dir)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output, or predictions of another run in OUTPUT.parts")
    parser.add_argument("--batch_size", type=int, default=8, help="examples per generate call on each rank")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--num_crops", type=int, help="tiles per image (default: the model's preprocessor_config.json)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPUs that have it, else float32")
    parser.add_argument("--attn_implementation", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    args = parser.parse_args(argv)
    if (args.jsonl or args.image_dir) and not args.output:
        parser.error("--output is needed with --jsonl and --image_dir (one JSON line per example)")
    if args.image and args.output:
        parser.error("--output is for batch mode (--jsonl, --image_dir); with --image the answer is printed")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--batch_size and --max_new_tokens must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world_size, device = distributed()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if rank == 0 else logging.WARNING)
    try:
        check_max_new_tokens(args)
        examples = build_examples(args)
        for example in examples:
            for path in example["images"]:
                check_image_file(Path(path))
        if args.image:
            from ..evaluation.generation import AnswerGenerator

            example = open_images(examples[0])
            model, processor = load(args, device)
            answer = AnswerGenerator(model, processor, args.max_new_tokens)
            with torch.no_grad():
                print(answer([example])[0])
        else:
            predict_batch(args, examples, rank, world_size, device)
    except (PredictError, ExportError, DataError, FileNotFoundError) as error:
        prefix = f"[rank {rank}] " if world_size > 1 else ""
        print(f"{prefix}error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
