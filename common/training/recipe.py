"""The mechanics every recipe shares: logging, the Trainer, training with resume and reloading for evaluation.

A dataset script calls these in order: ``setup_logging``, the run folder's steps (`common.training.run_folder.RunFolder`:
lock, move a previous run aside, then, once the training data is read, claim and clear interrupted checkpoints),
``check_training_data`` (the validation pass), ``load_model_to_train`` (`model_setup.load_model` and
`model_setup.setup_training_mode` with the run's settings),
``build_collator``, ``build_trainer``, ``evaluate_before``, ``train``, the run folder's ``save_final``,
``evaluate_after`` and ``finish``; its ``main`` is wrapped in ``exit_on_bad_input``.
"""

from __future__ import annotations

import ast
import functools
import gc
import logging
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data.collator import Phi3VCollator
from ..data.dataset import RecipeDataset
from ..data.scan_cache import ScanCache
from ..data.validation import SkipLog, validate_evaluation_data, validate_training_data
from ..dtypes import SAVE_DTYPES
from ..errors import DataError
from ..evaluation.periodic_evaluation import AnswersAsTargets, GenerationEvaluation, run_evaluation
from ..evaluation.plotting import plot_training_curves
from ..io import write_json_atomically
from ..model.checkpoint_files import weights_only_loads
from ..model.official_files import TOWER_PREFIX, BaseCheckpoint
from ..ranks import barrier, is_main_process, largest, rank_prefix
from .arguments import FinetuneArguments, evaluates_during_training
from .model_setup import UnsafeCheckpointError, load_model, setup_training_mode, to_device
from .optimizer import build_optimizer, log_part_rates, part_groups, part_learning_rates, separate_rates
from .preemption import PREEMPTED_EXIT_CODE, StopOnSignal, announce_stop
from .run_folder import (
    CheckpointWriteError,
    RunFolder,
    RunFolderError,
    check_free_space,
    newest_complete,
    read_json,
    release_held_locks,
    resumes,
)

logger = logging.getLogger(__name__)


def setup_logging(args: FinetuneArguments) -> None:
    """Our progress at INFO on the main process; transformers only warns, except the Trainer's run summary."""
    level = logging.INFO if args.process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    transformers.logging.set_verbosity_warning()
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.setLevel(level)
    trainer_logger.addFilter(UNUSED_TOWER_KEYS)


class UnusedTowerKeys(logging.Filter):
    """Leaves the base's unused tower tensors out of the Trainer's "unexpected keys" warning when it loads a
    checkpoint back: every checkpoint carries them (`Phi3VForCausalLM.save_pretrained`), they are not weights the
    model lacks a place for. The warning goes when nothing else is left in it."""

    WARNING = "There were unexpected keys in the checkpoint model loaded: "

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.WARNING):
            return True
        try:
            names = ast.literal_eval(message[len(self.WARNING):].rstrip("."))
        except (ValueError, SyntaxError):
            return True
        others = [name for name in names if not name.startswith(TOWER_PREFIX)]
        record.msg, record.args = f"{self.WARNING}{others}.", ()
        return bool(others)


UNUSED_TOWER_KEYS = UnusedTowerKeys()


def exit_on_bad_input(main):
    """Wrap a script's main: bad data, a missing file or an unsafe checkpoint ends the run with its message
    and exit code 1 instead of a traceback, and gives the output folder's lock back."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (DataError, FileNotFoundError, UnsafeCheckpointError, RunFolderError, CheckpointWriteError) as error:
            release_held_locks()
            print(f"{rank_prefix()}error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return wrapper


_skip_logs: dict[str, SkipLog] = {}


def skip_log_for(args: FinetuneArguments) -> SkipLog | None:
    """The run's record of skipped examples under --skip_bad_examples (None without it); emptied on a fresh
    run, kept on resume. One instance per output folder, shared by the data loaders and the collator."""
    if not args.skip_bad_examples:
        return None
    key = str(Path(args.output_dir).resolve())
    if key not in _skip_logs:
        skip_log = SkipLog(args.output_dir, main_process=is_main_process())
        if not resumes(args):
            skip_log.reset()
        _skip_logs[key] = skip_log
    return _skip_logs[key]


def check_evaluation_data(eval_set: RecipeDataset, processor, args: FinetuneArguments) -> RecipeDataset:
    """The validation pass over an evaluation split, before training, with --skip_bad_examples applied; its
    findings are kept in the run folder for a restart (`common.data.scan_cache`)."""
    return validate_evaluation_data(eval_set, processor, skip_log_for(args), cache=ScanCache(args.output_dir))


def check_training_data(train_set: RecipeDataset, processor, args: FinetuneArguments, run_folder: RunFolder) -> RecipeDataset:
    """The validation pass (see `common.data.validation`: shared out over the ranks, its findings kept in the run folder
    for a restart), with --skip_bad_examples and --max_length applied."""
    # The validation pass checks the draws that the first epoch makes (see `RecipeDataset`).
    train_set.seed = args.seed
    cache = ScanCache(args.output_dir, {id(train_set): run_folder.claim(train_set).identity["data"]})
    return validate_training_data(train_set, processor, args.max_length, skip_log_for(args), cache=cache)


def build_collator(processor, args: FinetuneArguments, train_set: RecipeDataset) -> Phi3VCollator:
    return Phi3VCollator(
        processor, max_length=args.max_length, padding_free=args.padding_free, skip_log=train_set.skip_log
    )


# The Trainer internals the recipes build on, read against transformers 5.24.0 (requirements.txt): the checkpoint
# save is overridden, the DataLoader builder called. tests/test_run_object.py fails when a signature changes.
TRAINER_INTERNALS = {
    "_save_checkpoint": "(self, model: torch.nn.modules.module.Module, trial: 'optuna.Trial | dict[str, Any] | None') -> None",
    "_get_dataloader": (
        "(self, dataset: torch.utils.data.dataset.Dataset, description: str, batch_size: int, sampler_fn: "
        "collections.abc.Callable[[torch.utils.data.dataset.Dataset], torch.utils.data.sampler.Sampler] | None = None, "
        "is_training: bool = False, dataloader_key: str | None = None) -> torch.utils.data.dataloader.DataLoader"
    ),
}


class RecipeTrainer(Trainer):
    """The HF Trainer with length-grouped batches from exact token lengths, checkpoints that its run folder
    (`common.training.run_folder.RunFolder`) writes and can trust, and a clean stop on SIGTERM/SIGUSR1 (`common.training.preemption`).

    `run_folder` is the script's; a trainer built without one (the tests) makes its own from `args` and claims
    the folder at its first save. The run folder rotates the checkpoints (it read --save_total_limit when it was
    built): the Trainer's own rotation, which would delete other runs' and incomplete checkpoints, is off.
    """

    def __init__(self, *args, run_folder: RunFolder | None = None, generation_evaluation: GenerationEvaluation | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_folder = RunFolder(self.args) if run_folder is None else run_folder
        self.args.save_total_limit = None
        self.stop_signal = StopOnSignal()
        self.add_callback(self.stop_signal)
        self.add_callback(ContinueSchedule(self.run_folder))
        self.add_callback(KeepOnlyBest(self.run_folder, self.stop_signal))
        self.generation_evaluation = generation_evaluation
        if isinstance(self.train_dataset, RecipeDataset):
            self.train_dataset.seed = self.args.seed
            self.add_callback(EpochOfDraws(self.train_dataset))

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The evaluations --eval_strategy asks for score the recipe's metric by generation, plus eval_loss
        (`common.evaluation.periodic_evaluation`); a dataset passed in explicitly gets the Trainer's own loss evaluation."""
        if self.generation_evaluation is None or eval_dataset is not None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = self.generation_evaluation(self, metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def create_optimizer(self, model=None):
        """The optimizer --optim names, with a learning rate per part (`common.training.optimizer`); logs each part's rate."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            rates = part_learning_rates(self.args.learning_rate, self.args.vision_learning_rate, self.args.projection_learning_rate)
            groups = part_groups(opt_model, rates, self.args.weight_decay, self.get_decay_parameter_names(opt_model))
            log_part_rates(groups)
            if not separate_rates(rates):
                # One rate for every part: the Trainer's own two groups, the layout of earlier checkpoints.
                return super().create_optimizer(model)
            self.optimizer = build_optimizer(self, opt_model, groups)
        return self.optimizer

    def get_train_dataloader(self):
        """The Trainer's training DataLoader with the sampler `train_sampler` chooses."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        # The Trainer's own body with its sampler swapped; `_get_dataloader` is read against transformers 5.24.0
        # too (its signature is checked by tests/test_run_object.py).
        return self._get_dataloader(
            dataset=self.train_dataset, description="Training", batch_size=self._train_batch_size,
            sampler_fn=self.train_sampler, is_training=True,
        )

    def train_sampler(self, dataset=None):
        """--train_sampling_strategy group_by_length over a RecipeDataset: batches grouped by exact token lengths,
        measured without decoding images; any other strategy or dataset: the Trainer's own sampler."""
        dataset = self.train_dataset if dataset is None else dataset
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(dataset, RecipeDataset):
            # The stock sampler would read every example (decoding its images) to measure it; the validation pass
            # has left the lengths on the dataset.
            lengths = dataset.lengths(self.processing_class)
            megabatch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(megabatch, lengths=lengths)
        return super()._get_train_sampler(dataset)

    def _save_checkpoint(self, model, trial):
        # The Trainer's checkpoint save (read against transformers 5.24.0), written by the run folder: markers,
        # manifest, rotation (see the class).
        if self.run_folder.claim_made is None:
            # Trainer.train called directly, without a script's main(): the folder is claimed at the first save.
            self.run_folder.lock()
            self.run_folder.move_previous_run_aside()
            self.run_folder.claim(self.train_dataset)
        self.stop_signal.saving = True
        try:
            checkpoint = self.run_folder.save_checkpoint(
                lambda: super(RecipeTrainer, self)._save_checkpoint(model, trial), self.state.global_step,
                self.state.best_model_checkpoint, self.processing_class.tokenizer,
            )
        finally:
            self.stop_signal.saving = False
        self.stop_signal.newest_complete = str(checkpoint)

    def save_checkpoint(self) -> None:
        """A checkpoint of the current step outside the Trainer's own schedule (a stop after the last step)."""
        self._save_checkpoint(self.model_wrapped, trial=None)


def continue_schedule(scheduler) -> list[float] | None:
    """After a checkpoint is loaded: the scheduler was rebuilt from the arguments and took the checkpoint's step
    count, but the optimizer holds the rates the checkpoint's schedule gave its last step. For an extended run
    those are the old, shorter schedule's (with a linear decay, 0), and the next step would train at them. Set
    them to the rebuilt schedule's rates at this step (for a run of unchanged length, the same values), those a
    run planned at this length from the start has here; returns them (None for a scheduler that is not a
    LambdaLR, whose rates are left as loaded)."""
    scheduler = getattr(scheduler, "scheduler", scheduler)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return None
    rates = [base * rule(scheduler.last_epoch) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates
    return rates


class ContinueSchedule(TrainerCallback):
    """On every resume, once the Trainer has loaded the checkpoint's optimizer and scheduler: a run of the same
    length gets back the rates it had; an extended one (even one stopped again before its first checkpoint) the
    new schedule's (`continue_schedule`)."""

    def __init__(self, run_folder: RunFolder):
        self.run_folder = run_folder

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        if state.global_step == 0:
            return
        rates = continue_schedule(lr_scheduler)
        claim = self.run_folder.claim_made
        if claim is not None and claim.extension:
            logger.warning(
                "extended run (%s): step %d of %d; the learning-rate schedule is rebuilt for %d steps and continues "
                "from step %d at %s", claim.extension, state.global_step, state.max_steps, state.max_steps,
                state.global_step, ", ".join(f"{rate:.3g}" for rate in rates) if rates else "the rates it had",
            )


class KeepOnlyBest(TrainerCallback):
    """The end of training under --save_total_limit 1: only the best checkpoint stays (`RunFolder.keep_only_best`).
    Not after a stop by a signal, whose resumed run needs the checkpoint just written."""

    def __init__(self, run_folder: RunFolder, stop: StopOnSignal):
        self.run_folder, self.stop = run_folder, stop

    def on_train_end(self, args, state, control, **kwargs):
        if self.stop.stopped_at_step is None and self.run_folder.claim_made is not None:
            self.run_folder.keep_only_best(state.best_model_checkpoint)


class EpochOfDraws(TrainerCallback):
    """Gives the training set each epoch before its examples are read: their random draws follow it."""

    def __init__(self, dataset: RecipeDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        # The epoch starting: state.epoch is its start, or how far into it a resumed checkpoint was.
        self.dataset.set_epoch(int(state.epoch))


class TrainingCurvesCallback(TrainerCallback):
    """Writes training_curves.png at the end of training, so even a run that stops later leaves its curves."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_training_curves(state.log_history, Path(args.output_dir) / "training_curves.png")


def build_trainer(
    model, args: FinetuneArguments, run_folder: RunFolder, train_dataset, data_collator, processor, eval_dataset=None,
    metric: str | None = None,
) -> RecipeTrainer:
    """The Trainer for a recipe; with --eval_strategy steps|epoch it also scores `metric` on `eval_dataset` (an
    evaluation split, as for `evaluate_before`) during training. As the Trainer is what will write to --output_dir,
    its filesystem is checked first: a run it cannot hold one checkpoint plus the final model of stops here
    (`run_folder.check_free_space`; --skip_disk_check to go on).

    `metric` None (a recipe evaluated by its loss alone, `finetune_hf_trainer_custom.py --metric none`): every
    evaluation is the Trainer's own eval_loss over `eval_dataset` answered with its references, and one at the
    start of training (--eval_on_start) stands for the evaluation before training unless --skip_eval_before;
    `loss_evaluations` collects them."""
    check_free_space(Path(args.output_dir), *expected_save_bytes(model, args), skip=args.skip_disk_check)
    evaluation = None
    loss_set = None
    if metric is None and eval_dataset is not None:
        loss_set = AnswersAsTargets(eval_dataset)
        # Not under QLoRA on CPU: a no-grad forward before training would corrupt the 4-bit weights (evaluate_before).
        if not args.skip_eval_before and not (args.training_mode == "qlora" and args.device.type == "cpu"):
            args.eval_on_start = True
    elif evaluates_during_training(args):
        if eval_dataset is None or metric is None:
            raise ValueError("--eval_strategy needs the script to pass build_trainer its eval_dataset and metric")
        evaluation = GenerationEvaluation(
            eval_dataset, metric, processor, args.generation_settings(), padding_free=args.padding_free,
            pin_memory=args.dataloader_pin_memory, prefetch_factor=args.dataloader_prefetch_factor,
        )
        loss_set = evaluation.loss_set
    return RecipeTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=loss_set,
        data_collator=data_collator,
        processing_class=processor,
        callbacks=[TrainingCurvesCallback()],
        run_folder=run_folder,
        generation_evaluation=evaluation,
    )


def _count(parameter) -> int:
    # ZeRO-3 leaves each rank an empty shard; ds_numel is the whole parameter's size. A 4-bit weight's numel
    # counts its packed bytes; quant_state.shape is the layer's.
    state = getattr(parameter, "quant_state", None)
    if state is not None:
        return math.prod(state.shape)
    return getattr(parameter, "ds_numel", 0) or parameter.numel()


def expected_save_bytes(model, args: FinetuneArguments) -> tuple[int, int]:
    """About how many bytes (one checkpoint, the final save) this run writes to --output_dir.

    A checkpoint holds the weights (the adapters only under LoRA) and the optimizer's states: under DeepSpeed
    ZeRO-1/2, the weights twice (model.safetensors and global_stepN's model states, in DeepSpeed's dtype) and
    per trainable parameter an fp32 master copy and two fp32 Adam moments; otherwise two Adam moments in the
    weights' dtype. The final save writes the whole model in the training dtype and then its copy in the saved
    dtype (`export.finalize_weights`), or the adapters, plus the merged model under --merge_lora."""
    parameters = list(model.parameters())
    trainable = [p for p in parameters if p.requires_grad]
    lora = args.training_mode in ("lora", "qlora")
    deepspeed = getattr(args, "hf_deepspeed_config", None) if args.deepspeed else None
    width = torch.empty(0, dtype=deepspeed.dtype()).element_size() if deepspeed else None
    size = lambda group: sum(_count(p) * (width or p.element_size()) for p in group)
    weights = size(trainable if lora else parameters)
    if deepspeed:
        stage = deepspeed.get_value("zero_optimization.stage", 0)
        checkpoint = weights * (1 if stage == 3 else 2) + 12 * sum(_count(p) for p in trainable)
    else:
        checkpoint = weights + 2 * size(trainable)
    saved = SAVE_DTYPES.get(args.save_dtype) or BaseCheckpoint(args.model_name_or_path).torch_dtype()
    whole = sum(_count(p) for p in parameters if not (lora and p.requires_grad)) * torch.empty(0, dtype=saved).element_size()
    if lora:
        final = weights + (whole if args.merge_lora else 0)
    else:
        final = weights + whole
    return checkpoint, final


def train(trainer: RecipeTrainer, args: FinetuneArguments):
    """Train from scratch or from the checkpoint `RunFolder.claim` chose; on SIGTERM/SIGUSR1 write a checkpoint
    and exit with PREEMPTED_EXIT_CODE instead of returning."""
    claim = trainer.run_folder.claim_made
    if claim is None:
        raise RuntimeError("train: claim the run folder first (RunFolder.claim in the script's main)")
    stop = trainer.stop_signal
    stop.newest_complete = claim.checkpoint
    with weights_only_loads():
        result = trainer.train(resume_from_checkpoint=claim.checkpoint)
    signum = largest(stop.signum) if stop.stopped_at_step is None else 0
    if signum:
        # The signal came after the last step's vote: training is done, but the final save and evaluation may
        # not fit in the time left, so stop with a checkpoint of the last step, which resume turns into both.
        stop.signum, stop.stopped_at_step = signum, trainer.state.global_step
        last = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{stop.stopped_at_step}"
        if newest_complete(Path(args.output_dir), claim.run_id) != last:
            trainer.save_checkpoint()
    if stop.stopped_at_step is not None:
        stop_preempted(stop, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{stop.stopped_at_step}")
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    return result


def stop_preempted(stop: StopOnSignal, checkpoint: Path) -> None:
    message = announce_stop(stop, checkpoint)
    if is_main_process():
        print(message, file=sys.stderr, flush=True)
    # No rank may exit before local rank 0 has left its message for the launcher: torchrun kills the other
    # workers as soon as one exits with a code other than 0.
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(PREEMPTED_EXIT_CODE)


def load_model_to_train(args: FinetuneArguments):
    """The base model loaded for this run and set up for its training mode; the run's precision is logged first."""
    logger.info("%s", args.precision())
    return setup_training_mode(load_model(args.model_name_or_path, **args.model_loading()), **args.training_mode_settings())


def load_trained_model(args: FinetuneArguments, output_dir: str | Path | None = None, quantize: bool | None = None):
    """Load what training wrote, the way a user would.

    Full or frozen-vision training wrote a whole model: ``Phi3VForCausalLM.from_pretrained(output_dir)``.
    LoRA wrote an adapter: load the base model, then ``PeftModel.from_pretrained(base, output_dir)``.
    `quantize` overrides whether the base loads in 4 bits (default: as the run trained it).
    """
    output_dir = Path(output_dir or args.output_dir)
    loading = args.model_loading()
    if quantize is not None:
        loading["qlora_compute_dtype"] = args.compute_dtype if quantize else None
    if args.training_mode in ("lora", "qlora"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(args.model_name_or_path, **loading), output_dir)
    else:
        model = load_model(output_dir, **loading)
    return to_device(model, args.device).eval()


def free_memory() -> None:
    """Return freed training memory to the device before the model is loaded again for evaluation."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_before(model, processor, eval_dataset, metric: str, args: FinetuneArguments) -> dict:
    """Score the untrained model. Under QLoRA on CPU a separate load is scored: bitsandbytes repacks 4-bit
    weights for inference after a no-grad forward on CPU, and later LoRA gradients would be silently wrong."""
    if args.training_mode == "qlora" and args.device.type == "cpu":
        fresh = load_model(args.model_name_or_path, **args.model_loading())
        summary = run_evaluation(fresh, processor, eval_dataset, metric, args.generation_settings(), "eval_before.json")
        del fresh
        free_memory()
        return summary
    # DeepSpeed moves the model to the GPU only when training starts; generation on the CPU would crawl.
    to_device(model, args.device)
    return run_evaluation(model, processor, eval_dataset, metric, args.generation_settings(), "eval_before.json")


def evaluate_after(processor, eval_dataset, metric: str, args: FinetuneArguments, file_name: str = "eval_after.json") -> dict:
    """Score what training wrote, loaded as a user would load it (`load_trained_model`), into `file_name`."""
    model = load_trained_model(args)
    summary = run_evaluation(model, processor, eval_dataset, metric, args.generation_settings(), file_name)
    del model
    free_memory()
    return summary


def loss_evaluations(trainer: RecipeTrainer, args: FinetuneArguments) -> dict[str, dict]:
    """For a trainer built without a metric: the eval_loss of the start of training ("before") and a new one after
    training ("after", unless --skip_eval_after), each also written to eval_before.json / eval_after.json."""
    evaluations = {}
    start = next((entry for entry in trainer.state.log_history if "eval_loss" in entry), None)
    if not args.skip_eval_before and start is not None:
        evaluations["before"] = start["eval_loss"]
    if not args.skip_eval_after:
        evaluations["after"] = trainer.evaluate()["eval_loss"]
    summaries = {}
    for name, loss in evaluations.items():
        summaries[name] = {"metric": "loss", "score": loss, "num_examples": len(trainer.eval_dataset), "num_skipped": 0}
        if is_main_process():
            write_json_atomically(Path(args.output_dir) / f"eval_{name}.json", summaries[name])
    return summaries


def saved_model_step(args: FinetuneArguments, log_history: list[dict]) -> int:
    """The step whose weights the final model holds: the last one, or under --load_best_model_at_end the best
    checkpoint's (the Trainer loaded it back before the final save)."""
    state = read_json(Path(args.output_dir) / TRAINER_STATE_NAME) or {}
    if args.load_best_model_at_end and state.get("best_global_step"):
        return state["best_global_step"]
    return max((entry.get("step", 0) for entry in log_history), default=0)


def finish(args: FinetuneArguments, run_folder: RunFolder, log_history: list[dict], evaluations: dict[str, dict]) -> None:
    """Redraw the curves with the before/after evaluation scores, print a summary, give the output folder's lock
    back, close the process group."""
    if is_main_process():
        points = []
        for name, step in (("before", 0), ("after", saved_model_step(args, log_history))):
            if name in evaluations:
                points.append({"step": step, f"eval_{evaluations[name]['metric']}": evaluations[name]["score"]})
        plot_training_curves(log_history, Path(args.output_dir) / "training_curves.png", extra_points=points)
        skip_log = skip_log_for(args)
        if skip_log is not None and skip_log.count():
            logger.warning("%d examples were skipped as unusable; see %s", skip_log.count(), skip_log.path)
        for name, summary in evaluations.items():
            logger.info("evaluation (%s): %s = %.4f on %d examples", name, summary["metric"], summary["score"], summary["num_examples"])
    run_folder.release()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


__all__ = [
    "RecipeTrainer",
    "build_trainer",
    "train",
    "load_trained_model",
    "load_model_to_train",
    "CheckpointWriteError",
    "finish",
    "evaluate_before",
    "evaluate_after",
    "loss_evaluations",
    "check_evaluation_data",
    "check_training_data",
    "skip_log_for",
    "build_collator",
    "exit_on_bad_input",
    "setup_logging",
    "free_memory",
]
