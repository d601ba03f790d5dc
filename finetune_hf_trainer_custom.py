"""Fine-tune Phi-3.5-vision on your own conversations, from data files or a dataset, without changing code.

Data (`common/data/formats.py` has the details): `--train_file` in the LLaVA format (`{"id", "image", "conversations":
[{"from", "value"}]}`, a JSON array or JSONL), the chat messages format (`{"messages": [{"role", "content"}]}`,
content a string or text/image parts) or this project's JSONL (`convert_ucf101.py` output); `--format auto`
detects which from the first rows and logs it. Image paths are relative to `--image_root` (default: the train
file's folder). Or a hub dataset (`--dataset_name`, `--dataset_config`) or a local copy (`--dataset_path`:
save_to_disk, parquet, JSONL) with `--split`, the turns in `--messages_column` and the images in `--images_column`.
Rows may have no image or several. Evaluation: `--eval_file`, `--eval_split`, or `--eval_fraction` of the
training rows held out (seeded by --seed); `--eval_turn` scores the first, the last or every assistant turn,
each answered with the turns before it as context; `--metric none` evaluates by eval_loss alone. A system turn
(or `--system_prompt` for rows without one) goes into the Phi-3 template and is never a training target.

Launch commands (one node with 8 GPUs; multi-node: add `--nnodes N --node_rank R --rdzv_backend c10d
--rdzv_endpoint HOST:PORT` to torchrun):

    # LoRA on a LLaVA-format file, 5% of the rows held out for evaluation
    torchrun --nproc_per_node=8 finetune_hf_trainer_custom.py --train_file ./data/mine/train.json \
        --image_root ./data/mine/images --eval_fraction 0.05 --bf16 --use_flash_attention --use_lora \
        --learning_rate 2e-4 --num_train_epochs 2 --output_dir ./output/mine-lora
    # full fine-tuning (DeepSpeed ZeRO-2) on chat messages with a system prompt, scored on every turn
    torchrun --nproc_per_node=8 finetune_hf_trainer_custom.py --train_file ./data/chat/train.jsonl \
        --eval_file ./data/chat/val.jsonl --system_prompt "You are a careful visual assistant." \
        --eval_turn all --metric anls --bf16 --use_flash_attention --learning_rate 4e-5 --output_dir ./output/chat-full
    # a Cauldron subset from the hub, evaluated by its loss
    torchrun --nproc_per_node=8 finetune_hf_trainer_custom.py --dataset_name HuggingFaceM4/the_cauldron \
        --dataset_config ai2d --messages_column texts --images_column images --eval_fraction 0.02 \
        --metric none --bf16 --use_flash_attention --use_lora --output_dir ./output/ai2d-lora

    # CPU smoke run, no downloads
    python -m common.tiny --out ./tiny-phi3v
    python -m common.synthetic custom_llava --out ./data/custom-synthetic
    torchrun --nproc_per_node=2 finetune_hf_trainer_custom.py --model_name_or_path ./tiny-phi3v \
        --train_file ./data/custom-synthetic/train.json --eval_fraction 0.25 --num_crops 1 --batch_size 4 \
        --batch_size_per_gpu 2 --max_steps 4 --dataloader_num_workers 0 --use_lora --output_dir ./output/custom-smoke
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

from common.data.formats import CustomData
from common.training.arguments import ArgumentError, parse_args, set_launcher_environment
from common.training.model_setup import load_processor
from common.training.preemption import stop_signals_end_the_run
from common.training.recipe import (
    build_collator,
    build_trainer,
    check_evaluation_data,
    check_training_data,
    evaluate_after,
    evaluate_before,
    exit_on_bad_input,
    finish,
    free_memory,
    load_model_to_train,
    loss_evaluations,
    setup_logging,
    skip_log_for,
    train,
)
from common.training.run_folder import RunFolder


@dataclass
class CustomArguments:
    train_file: str | None = field(default=None, metadata={"help": "Training conversations: LLaVA JSON/JSONL, messages JSON/JSONL or our JSONL."})
    eval_file: str | None = field(default=None, metadata={"help": "Evaluation conversations, in the train file's format."})
    eval_fraction: float | None = field(default=None, metadata={"help": "Hold out this fraction of the training rows (seeded by --seed) for evaluation."})
    image_root: str | None = field(default=None, metadata={"help": "Folder the image paths are relative to (default: the train file's folder)."})
    format: Literal["auto", "llava", "messages", "jsonl"] = field(default="auto", metadata={"help": "Format of the data files; auto detects it."})
    dataset_name: str | None = field(default=None, metadata={"help": "A hub dataset instead of files."})
    dataset_config: str | None = field(default=None, metadata={"help": "The hub dataset's config (subset)."})
    dataset_path: str | None = field(default=None, metadata={"help": "A local dataset instead of files: save_to_disk folder, parquet or JSONL by split."})
    split: str = field(default="train", metadata={"help": "The dataset's training split."})
    eval_split: str | None = field(default=None, metadata={"help": "The dataset's evaluation split."})
    messages_column: str = field(default="messages", metadata={"help": "The dataset column holding the turns."})
    images_column: str = field(default="images", metadata={"help": "The dataset column holding the images."})
    metric: Literal["exact_match", "accuracy", "anls", "none"] = field(
        default="accuracy", metadata={"help": "Score of generated answers (accuracy ignores case and dots), or none: eval_loss only."}
    )
    eval_turn: Literal["first", "last", "all"] = field(default="first", metadata={"help": "Which assistant turns evaluation answers."})
    system_prompt: str | None = field(default=None, metadata={"help": "System turn for rows that have none."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N rows only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N rows only."})

    def __post_init__(self):
        sources = [flag for flag, value in (("--train_file", self.train_file), ("--dataset_name", self.dataset_name), ("--dataset_path", self.dataset_path)) if value]
        if len(sources) != 1:
            raise ArgumentError(f"give exactly one of --train_file, --dataset_name and --dataset_path (got {', '.join(sources) or 'none'})")
        evaluations = [flag for flag, value in (("--eval_file", self.eval_file), ("--eval_split", self.eval_split), ("--eval_fraction", self.eval_fraction)) if value]
        if len(evaluations) != 1:
            raise ArgumentError(f"give exactly one of --eval_file, --eval_split and --eval_fraction (got {', '.join(evaluations) or 'none'})")
        if self.eval_file and not self.train_file:
            raise ArgumentError("--eval_file goes with --train_file; a dataset's evaluation rows come from --eval_split or --eval_fraction")
        if self.eval_split and self.train_file:
            raise ArgumentError("--eval_split is a dataset's split; with --train_file use --eval_file or --eval_fraction")
        if self.format != "auto" and not self.train_file:
            raise ArgumentError("--format is the format of --train_file; a dataset's turns are read in any of the formats")
        if self.eval_fraction is not None and not 0 < self.eval_fraction < 1:
            raise ArgumentError(f"--eval_fraction must be between 0 and 1, got {self.eval_fraction}")


def chosen_metric(argv: list[str] | None) -> str | None:
    """--metric, read before the full parse, which needs it as the default --metric_for_best_model; None for none."""
    reader = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    reader.add_argument("--metric", default=CustomArguments.metric)
    metric = reader.parse_known_args(argv)[0].metric
    return None if metric == "none" else metric


@stop_signals_end_the_run
@exit_on_bad_input
def main(argv: list[str] | None = None) -> None:
    metric = chosen_metric(argv)
    set_launcher_environment(argv)
    args, data_args = parse_args(CustomArguments, argv=argv, defaults={"max_new_tokens": 64}, metric=metric)
    setup_logging(args)
    run_folder = RunFolder(args)
    run_folder.lock()
    run_folder.move_previous_run_aside()

    data = CustomData(data_args, args.seed, skip_log_for(args), args.output_dir)
    train_set, eval_set = data.datasets()

    processor = load_processor(args.model_name_or_path, args.num_crops)
    run_folder.claim(train_set)
    run_folder.clear_interrupted_checkpoints()
    train_set = check_training_data(train_set, processor, args, run_folder)
    eval_set = check_evaluation_data(eval_set, processor, args)
    data.warn(train_set, args.batch_size, args.max_steps, args.num_train_epochs)
    model = load_model_to_train(args)
    collator = build_collator(processor, args, train_set)
    trainer = build_trainer(model, args, run_folder, train_set, collator, processor, eval_set, metric)

    evaluations = {}
    if metric and not args.skip_eval_before:
        evaluations["before"] = evaluate_before(model, processor, eval_set, metric, args)
    train(trainer, args)
    run_folder.save_final(trainer, processor)
    if metric is None:
        evaluations = loss_evaluations(trainer, args)

    log_history = trainer.state.log_history
    del trainer, model
    free_memory()
    if metric and not args.skip_eval_after:
        evaluations["after"] = evaluate_after(processor, eval_set, metric, args)
    finish(args, run_folder, log_history, evaluations)


if __name__ == "__main__":
    main()
