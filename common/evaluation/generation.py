"""Batched greedy evaluation of a Phi-3.5-vision model on evaluation examples, on one or many processes.

An evaluation example is ``{"id", "images", "messages": [user message], "references": [str, ...]}``
(:mod:`common.data.conversation`). :func:`evaluate` generates an answer per example, scores it with
``metrics.SCORERS[metric]`` and reports the mean. Under ``torch.distributed`` rank r evaluates examples
r, r + W, r + 2W, ... and rank 0 writes the per-example records of all ranks in the original order.

Loading models and data stays with the callers; this module only runs them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm
from transformers.integrations import is_deepspeed_zero3_enabled

from ..data.collator import LoadingError, Phi3VGenerationCollator
from ..errors import ExampleError
from ..io import write_json_atomically
from ..model.processing_phi3v import stop_token_ids
from ..ranks import rank_and_world
from .metrics import SCORERS

__all__ = ["AnswerGenerator", "GenerationSettings", "evaluate", "stop_token_ids"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """A run's settings for its evaluations by generation (`FinetuneArguments.generation_settings`): where the
    answers are written, the batch, the answer length, the DataLoader workers, and whether to generate under CUDA
    fp16 autocast (fp16 mixed precision, whose weights are fp32). The crops are the processor's."""

    output_dir: Path
    batch_size: int
    max_new_tokens: int
    num_workers: int = 0
    fp16_autocast: bool = False


def _unwrap(model):
    """(what to call generate on, the Phi3VForCausalLM inside) for a bare, PEFT, DDP or DeepSpeed-engine model."""
    generator = model
    # DDP and DeepSpeed engines keep the model as `.module`; an engine's ZeRO-3 hooks live on that module itself.
    while isinstance(getattr(generator, "module", None), torch.nn.Module):
        generator = generator.module
    base = generator.get_base_model() if hasattr(generator, "get_base_model") else generator
    return generator, base


def _pixel_dtype(base) -> torch.dtype:
    # The decoder's dtype can differ from the tower's (a frozen fp32 tower, a 4-bit decoder); the pixels
    # meet the tower first, at its patch embedding.
    return base.model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight.dtype


def _full_parameters(module, zero3: bool):
    """Context in which ``module`` computes with its full weights under ZeRO-3.

    ZeRO-3 leaves every rank a shard of each weight. A DeepSpeed engine registers hooks on every submodule
    (marking each with ``ds_id``) that gather the weights layer by layer during forward. A model partitioned
    by ``zero.Init`` but never put in an engine (loaded for evaluation only) has no such hooks and would
    compute with empty tensors, so its weights are gathered once for the whole loop: one full copy of the
    model per rank, which Phi-3.5-vision fits easily.
    """
    if not zero3 or hasattr(module, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


class AnswerGenerator:
    """Greedy answers for a batch of evaluation examples: the prompt building (`Phi3VGenerationCollator`), the
    stop ids and the decoding that the evaluation and `common.outputs.predict` share, so an answer is the same
    wherever it is generated. Call it under ``torch.no_grad()`` with the model in eval mode.

    ``model`` may be a Phi3VForCausalLM, a PEFT model around one, or a DDP/DeepSpeed wrapper of either.
    """

    def __init__(self, model, processor, max_new_tokens: int, synced_gpus: bool = False):
        tokenizer = processor.tokenizer
        self.tokenizer = tokenizer
        self.collate = Phi3VGenerationCollator(processor)
        self.generator, base = _unwrap(model)
        self.device, self.pixel_dtype = base.device, _pixel_dtype(base)
        self.generation_kwargs = dict(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            synced_gpus=synced_gpus,
        )

    def __call__(self, examples: list[dict]) -> list[str]:
        batch, _ = self.collate(examples)
        return self.generate(batch)

    def generate(self, batch: dict[str, torch.Tensor]) -> list[str]:
        """Answers for a batch the generation collator already made (in a DataLoader worker, say)."""
        batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.pixel_dtype)
        output_ids = self.generator.generate(**batch, **self.generation_kwargs)
        prompt_width = batch["input_ids"].shape[1]
        answers = self.tokenizer.batch_decode(output_ids[:, prompt_width:], skip_special_tokens=True)
        return [answer.strip() for answer in answers]


class _Shard(torch.utils.data.Dataset):
    """This rank's examples as ``(index, example)``; a ZeRO-3 filler (index None) reads example 0."""

    def __init__(self, examples, indices: list[int | None]):
        self.examples, self.indices = examples, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        return index, self.examples[0 if index is None else index]


class _CollateWithIndices:
    """The generation collator, keeping each example's index. An example that cannot be encoded becomes a
    `LoadingError`, whose message survives the trip out of a DataLoader worker as its one line."""

    def __init__(self, collate: Phi3VGenerationCollator):
        self.collate = collate

    def __call__(self, items):
        indices = [index for index, _ in items]
        try:
            batch, metadata = self.collate([example for _, example in items])
        except ExampleError as error:
            raise LoadingError(str(error)) from error
        return indices, batch, metadata


def is_fsdp_sharded(model) -> bool:
    """Whether `model`, or a model inside it, is sharded by FSDP2: its units gather their weights at every
    call, collectively, so every rank must make the same calls."""
    return any(isinstance(module, FSDPModule) for module in model.modules())


def evaluate(
    model,
    processor,
    examples,
    metric: str,
    output_file,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    desc: str = "evaluate",
    num_workers: int = 0,
) -> dict:
    """Generate greedily for every example, score with ``metric`` and return the mean.

    ``model`` may be a Phi3VForCausalLM, a PEFT model around one, or a DDP/DeepSpeed wrapper of either; it is
    put in eval mode and restored afterwards. ``examples`` is any indexable sequence (a list, a
    ``datasets.Dataset``): each process reads only the items of its own shard, one batch at a time. With
    ``num_workers`` > 0, that many DataLoader worker processes read, decode and preprocess the next batches
    while the model generates, as the training loader does; with 0 this process does it between batches.

    Every rank must call this. Rank 0 writes ``output_file`` (JSON: metric, score, num_examples and one
    ``{"index", "id", "prediction", "references", "score"}`` record per example, in the original order).
    Every rank returns ``{"metric", "score", "num_examples"}``.
    """
    if metric not in SCORERS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(SCORERS)}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    num_examples = len(examples)
    if num_examples == 0:
        raise ValueError("no evaluation examples")

    rank, world_size = rank_and_world()
    zero3 = is_deepspeed_zero3_enabled()
    synced_gpus = (zero3 or is_fsdp_sharded(model)) and world_size > 1
    shard: list[int | None] = list(range(rank, num_examples, world_size))
    if synced_gpus:
        # Under ZeRO-3 or FSDP each forward is a collective over all ranks, so every rank must make the same number
        # of generate calls: shorter shards are filled with example 0 (None here), whose answer is discarded.
        shard += [None] * (math.ceil(num_examples / world_size) - len(shard))

    scorer = SCORERS[metric]
    answer = AnswerGenerator(model, processor, max_new_tokens, synced_gpus=synced_gpus)
    batches = torch.utils.data.DataLoader(
        _Shard(examples, shard),
        batch_size=batch_size,
        collate_fn=_CollateWithIndices(answer.collate),
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
        pin_memory=answer.device.type == "cuda",
    )
    records = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _full_parameters(answer.generator, zero3):
            for indices, batch, metadata in tqdm(batches, desc=desc, disable=rank != 0):
                predictions = answer.generate(batch)
                for index, example_id, references, prediction in zip(indices, metadata["ids"], metadata["references"], predictions):
                    if index is None:
                        continue
                    records.append(
                        {
                            "index": index,
                            "id": example_id,
                            "prediction": prediction,
                            "references": references,
                            "score": float(scorer(prediction, references)),
                        }
                    )
    finally:
        model.train(was_training)

    if world_size > 1:
        shards = [None] * world_size
        dist.all_gather_object(shards, records)
        records = [record for shard_records in shards for record in shard_records]
    # Every rank assembles the same gathered list, so a broken split fails on all ranks alike instead of
    # leaving the others waiting on rank 0, and all return the identical summary without another collective.
    records.sort(key=lambda record: record["index"])
    if [record["index"] for record in records] != list(range(num_examples)):
        seen = [record["index"] for record in records]
        raise RuntimeError(
            f"the ranks scored indices {seen}, but each of the {num_examples} examples must be scored exactly once"
        )
    score = sum(record["score"] for record in records) / num_examples
    # Rows the validation pass left out (--skip_bad_examples) are not scored: the score is over the others.
    skipped = list(getattr(examples, "skipped", []))
    summary = {"metric": metric, "score": score, "num_examples": num_examples, "num_skipped": len(skipped)}
    if rank == 0:
        write_json_atomically(Path(output_file), {**summary, "skipped": skipped, "examples": records})
        left_out = f" ({len(skipped)} unusable examples skipped, not counted)" if skipped else ""
        logger.info("%s: %s = %.4f over %d examples%s (written to %s)", desc, metric, score, num_examples, left_out, output_file)
    return summary
