"""Fine-tune Phi-3.5-vision on DocVQA and score it with ANLS before and after training.

Data: the 1,000/200-example "mini" DocVQA (`nielsr/docvqa_1200_examples`) by default; `--full_train` trains on
the Cauldron's docvqa config (~10k documents, every question of a document as one conversation) and still
scores the mini test split. `--dataset_path DIR` reads the mini schema from a local folder instead.

Launch commands (one node with 8 GPUs; for several nodes add `--nnodes N --node_rank R --rdzv_backend c10d
--rdzv_endpoint HOST:PORT` to torchrun):

    # full fine-tuning, DeepSpeed ZeRO-2 (ds_configs/zero2.json, the default for this mode)
    torchrun --nproc_per_node=8 finetune_hf_trainer_docvqa.py --bf16 --use_flash_attention \
        --batch_size 64 --learning_rate 5e-6 --num_train_epochs 2 --output_dir ./output/docvqa-full
    # frozen vision tower
    torchrun --nproc_per_node=8 finetune_hf_trainer_docvqa.py --bf16 --use_flash_attention \
        --freeze_vision_model --learning_rate 1e-4 --num_train_epochs 2 --output_dir ./output/docvqa-frozen
    # LoRA (rank 32, alpha 16) and QLoRA
    torchrun --nproc_per_node=8 finetune_hf_trainer_docvqa.py --bf16 --use_flash_attention \
        --use_lora --lora_rank 32 --lora_alpha_ratio 0.5 --learning_rate 2e-4 --num_train_epochs 2 \
        --output_dir ./output/docvqa-lora
    torchrun --nproc_per_node=8 finetune_hf_trainer_docvqa.py --bf16 --use_flash_attention \
        --use_qlora --lora_rank 32 --lora_alpha_ratio 0.5 --learning_rate 2e-4 --num_train_epochs 2 \
        --output_dir ./output/docvqa-qlora
    # resume after an interruption: the same command plus --resume_from_checkpoint latest
    torchrun --nproc_per_node=8 finetune_hf_trainer_docvqa.py --bf16 --use_flash_attention \
        --batch_size 64 --learning_rate 5e-6 --num_train_epochs 2 --output_dir ./output/docvqa-full \
        --resume_from_checkpoint latest

    # CPU smoke test, no downloads: tiny random model and synthetic data in the real schema
    python -m common.tiny --out ./tiny-phi3v
    python -m common.synthetic docvqa --out ./data/docvqa-synthetic
    torchrun --nproc_per_node=2 finetune_hf_trainer_docvqa.py --model_name_or_path ./tiny-phi3v \
        --dataset_path ./data/docvqa-synthetic --num_crops 1 --batch_size 4 --batch_size_per_gpu 2 \
        --max_steps 4 --max_eval_samples 4 --dataloader_num_workers 0 --output_dir ./output/docvqa-smoke
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from common.data.dataset import RecipeDataset
from common.data.sources import cauldron_train_example, first_rows, load_split
from common.training.arguments import parse_args, set_launcher_environment
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
    setup_logging,
    train,
)
from common.training.run_folder import RunFolder

MINI_DOCVQA = "nielsr/docvqa_1200_examples"
CAULDRON = "HuggingFaceM4/the_cauldron"
METRIC = "anls"


@dataclass
class DocVQAArguments:
    full_train: bool = field(default=False, metadata={"help": "Train on the Cauldron's docvqa config (~10k documents)."})
    dataset_path: str | None = field(
        default=None, metadata={"help": "Local copy of the training data (mini schema, or the Cauldron's with --full_train)."}
    )
    eval_dataset_path: str | None = field(
        default=None, metadata={"help": "Local copy of the mini test split (default: --dataset_path without --full_train)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N rows only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N test rows only."})


def user_prompt(question: str) -> str:
    return f"<|image_1|>\n{question}\nAnswer briefly."


def mini_train_example(row: dict, index: int) -> dict:
    # A different reference answer each epoch, as the reference recipe does; RecipeDataset seeds `random` from
    # --seed, the epoch and the row's index, so the draw is the same with any number of workers and on resume.
    answer = random.choice(row["answers"])
    return {
        "images": [row["image"]],
        "messages": [
            {"role": "user", "content": user_prompt(row["query"]["en"])},
            {"role": "assistant", "content": answer},
        ],
    }


def eval_example(row: dict, index: int) -> dict:
    return {
        "id": str(row["id"]),
        "images": [row["image"]],
        "messages": [{"role": "user", "content": user_prompt(row["query"]["en"])}],
        "references": list(row["answers"]),
    }


@stop_signals_end_the_run
@exit_on_bad_input
def main(argv: list[str] | None = None) -> None:
    set_launcher_environment(argv)
    args, data_args = parse_args(DocVQAArguments, argv=argv, metric=METRIC)
    setup_logging(args)
    run_folder = RunFolder(args)
    run_folder.lock()
    run_folder.move_previous_run_aside()

    if data_args.full_train:
        train_rows, to_train_example = load_split(CAULDRON, "docvqa", "train", data_args.dataset_path), cauldron_train_example
    else:
        train_rows, to_train_example = load_split(MINI_DOCVQA, None, "train", data_args.dataset_path), mini_train_example
    eval_path = data_args.eval_dataset_path or (None if data_args.full_train else data_args.dataset_path)
    eval_rows = load_split(MINI_DOCVQA, None, "test", eval_path)
    train_set = RecipeDataset(first_rows(train_rows, data_args.max_train_samples), to_train_example, "docvqa train")
    eval_set = RecipeDataset(first_rows(eval_rows, data_args.max_eval_samples), eval_example, "docvqa test", for_training=False)

    processor = load_processor(args.model_name_or_path, args.num_crops)
    run_folder.claim(train_set)
    run_folder.clear_interrupted_checkpoints()
    train_set = check_training_data(train_set, processor, args, run_folder)
    eval_set = check_evaluation_data(eval_set, processor, args)
    model = load_model_to_train(args)
    collator = build_collator(processor, args, train_set)
    trainer = build_trainer(model, args, run_folder, train_set, collator, processor, eval_set, METRIC)

    evaluations = {}
    if not args.skip_eval_before:
        evaluations["before"] = evaluate_before(model, processor, eval_set, METRIC, args)
    train(trainer, args)
    run_folder.save_final(trainer, processor)

    log_history = trainer.state.log_history
    del trainer, model
    free_memory()
    if not args.skip_eval_after:
        evaluations["after"] = evaluate_after(processor, eval_set, METRIC, args)
    finish(args, run_folder, log_history, evaluations)


if __name__ == "__main__":
    main()
