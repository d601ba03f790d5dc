"""Evaluation during training: the recipe's own metric (ANLS, accuracy) by batched greedy generation, plus
``eval_loss``, wherever the Trainer's ``--eval_strategy`` asks for an evaluation.

`RecipeTrainer.evaluate` hands its evaluations to a `GenerationEvaluation`, so everything the Trainer builds on
its evaluation metrics works with the recipe's metric: ``eval_<metric>`` and ``eval_loss`` in the log history
and the loggers (and so in training_curves.png), ``--metric_for_best_model`` (which defaults to the recipe's
metric), ``--load_best_model_at_end`` and ``--save_strategy best``.

Each evaluation scores the whole evaluation split the script built (``--max_eval_samples`` limits it), on every
rank as `common.evaluation.generation.evaluate` does, and writes its per-example answers to ``eval_step<N>.json``.
"""

from __future__ import annotations

import contextlib
import time

import torch
from transformers.trainer_utils import speed_metrics

from ..data.collator import Phi3VCollator
from .generation import GenerationSettings, evaluate
from .metrics import SCORERS

__all__ = ["AnswersAsTargets", "GenerationEvaluation", "generation_autocast", "run_evaluation"]


class AnswersAsTargets(torch.utils.data.Dataset):
    """An evaluation split as training examples, for ``eval_loss``: each prompt answered with the example's
    first reference (the loss of one fixed answer per example, comparable from one evaluation to the next)."""

    def __init__(self, eval_set):
        self.eval_set = eval_set

    def __len__(self) -> int:
        return len(self.eval_set)

    def __getitem__(self, index: int) -> dict:
        example = self.eval_set[index]
        answer = {"role": "assistant", "content": example["references"][0]}
        return {"id": example["id"], "images": example["images"], "messages": [*example["messages"], answer]}


class GenerationEvaluation:
    """One evaluation during training: ``{prefix}_loss`` through the Trainer's own loop, then
    ``{prefix}_<metric>`` by generation with the model being trained (DDP, DeepSpeed engine or PEFT model)."""

    def __init__(self, eval_set, metric: str, processor, settings: GenerationSettings, padding_free: bool = False,
                 pin_memory: bool = True, prefetch_factor: int | None = None):
        """`settings` for the generation (`FinetuneArguments.generation_settings`); the loss batches are built as the
        Trainer's (--padding_free, --dataloader_pin_memory, --dataloader_prefetch_factor)."""
        if metric not in SCORERS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(SCORERS)}")
        self.eval_set, self.metric, self.processor, self.settings = eval_set, metric, processor, settings
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.loss_set = AnswersAsTargets(eval_set)
        # No --max_length here: the validation pass checked the evaluation split as prompts, and a loss is
        # still right for an example longer than the training limit.
        self.loss_collator = Phi3VCollator(processor, padding_free=padding_free)

    def __call__(self, trainer, metric_key_prefix: str = "eval") -> dict[str, float]:
        start = time.time()
        loss = trainer.evaluation_loop(
            self.loss_batches(trainer), description="eval loss", prediction_loss_only=True, metric_key_prefix=metric_key_prefix
        )
        step = trainer.state.global_step
        # Under fp16 or bf16 mixed precision the weights are fp32: generate under the same autocast as training.
        with trainer.accelerator.autocast():
            summary = run_evaluation(
                trainer.model_wrapped, self.processor, self.eval_set, self.metric, self.settings, f"eval_step{step}.json",
                desc=f"eval at step {step}",
            )
        metrics = {key: value for key, value in loss.metrics.items() if key == f"{metric_key_prefix}_loss"}
        metrics[f"{metric_key_prefix}_{self.metric}"] = summary["score"]
        metrics.update(speed_metrics(metric_key_prefix, start, num_samples=len(self.eval_set)))
        return metrics

    def loss_batches(self, trainer) -> torch.utils.data.DataLoader:
        """The evaluation split as training batches, sharded over the ranks as the Trainer shards its own."""
        settings = self.settings
        batches = torch.utils.data.DataLoader(
            self.loss_set,
            batch_size=settings.batch_size,
            sampler=torch.utils.data.SequentialSampler(self.loss_set),
            collate_fn=self.loss_collator,
            num_workers=settings.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if settings.num_workers else None,
        )
        return trainer.accelerator.prepare(batches)


def generation_autocast(fp16_autocast: bool):
    """fp16 mixed precision loads fp32 weights (`FinetuneArguments.model_dtype`): generate under the fp16 autocast that
    training computes in, rather than in fp32 at a fraction of a V100's tensor-core speed."""
    if fp16_autocast:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def run_evaluation(
    model, processor, eval_dataset, metric: str, settings: GenerationSettings, file_name: str, desc: str | None = None
) -> dict:
    """`evaluate` with a run's settings, writing its answers to `file_name` in the output folder."""
    with generation_autocast(settings.fp16_autocast):
        return evaluate(
            model,
            processor,
            eval_dataset,
            metric=metric,
            output_file=settings.output_dir / file_name,
            batch_size=settings.batch_size,
            max_new_tokens=settings.max_new_tokens,
            desc=desc or file_name.removesuffix(".json"),
            num_workers=settings.num_workers,
        )
