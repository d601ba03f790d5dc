"""Fine-tune Phi-3.5-vision to classify UCF-101 videos from 8 frames, scoring accuracy before and after training.

Data: run `convert_ucf101.py` first; it writes `DATA_DIR/ucf101_{train,val,test}.jsonl` and the sampled frames
under `DATA_DIR/images`. Every JSONL line is one video: 8 frames as 8 images in one prompt that lists the
classes, the class name as the answer. `finetune_hf_trainer_custom.py` trains on files of this layout (and on
LLaVA and chat-messages files) without code changes (see `common/data/dataset.py: load_jsonl_conversations`). Frames use num_crops 4 by default (8 images x 4 tiles).
Validation scores before and after training; `--eval_on_test` also scores the test split after training.

Launch commands (one node with 8 GPUs; multi-node: add `--nnodes N --node_rank R --rdzv_backend c10d
--rdzv_endpoint HOST:PORT` to torchrun):

    python convert_ucf101.py --out_dir ./data/ucf101
    # full fine-tuning, DeepSpeed ZeRO-2 (the default for this mode)
    torchrun --nproc_per_node=8 finetune_hf_trainer_ucf101.py --data_dir ./data/ucf101 --bf16 \
        --use_flash_attention --batch_size 16 --learning_rate 4e-5 --num_train_epochs 2 --output_dir ./output/ucf101-full
    # frozen vision tower, LoRA, QLoRA: add --freeze_vision_model, --use_lora or --use_qlora
    torchrun --nproc_per_node=8 finetune_hf_trainer_ucf101.py --data_dir ./data/ucf101 --bf16 \
        --use_flash_attention --use_lora --learning_rate 2e-4 --output_dir ./output/ucf101-lora

    # CPU smoke run, no downloads (./demo.sh runs a longer version of this that learns; see its settings)
    python -m common.tiny --out ./tiny-phi3v
    python -m common.synthetic ucf101_videos --out ./data/videos --classes 3
    python convert_ucf101.py --video_dir ./data/videos --out_dir ./data/ucf101-synthetic
    torchrun --nproc_per_node=2 finetune_hf_trainer_ucf101.py --model_name_or_path ./tiny-phi3v \
        --data_dir ./data/ucf101-synthetic --num_crops 1 --batch_size 4 --batch_size_per_gpu 2 --max_steps 4 \
        --dataloader_num_workers 0 --output_dir ./output/ucf101-smoke
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.data.dataset import RecipeDataset, jsonl_eval_examples, load_jsonl_conversations
from common.data.sources import first_rows
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
    skip_log_for,
    train,
)
from common.training.run_folder import RunFolder

METRIC = "accuracy"


@dataclass
class UCF101Arguments:
    data_dir: str = field(metadata={"help": "Output folder of convert_ucf101.py (ucf101_*.jsonl and images/)."})
    eval_on_test: bool = field(default=False, metadata={"help": "After training, also score the test split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N videos only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N videos only."})


def split_file(data_dir: Path, split: str) -> Path:
    path = data_dir / f"ucf101_{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `python convert_ucf101.py --out_dir {data_dir}` first")
    return path


@stop_signals_end_the_run
@exit_on_bad_input
def main(argv: list[str] | None = None) -> None:
    set_launcher_environment(argv)
    args, data_args = parse_args(UCF101Arguments, argv=argv, defaults={"num_crops": 4, "max_new_tokens": 16}, metric=METRIC)
    setup_logging(args)
    run_folder = RunFolder(args)
    run_folder.lock()
    run_folder.move_previous_run_aside()

    data_dir = Path(data_args.data_dir)
    images = data_dir / "images"
    train_file, val_file = split_file(data_dir, "train"), split_file(data_dir, "val")
    train_rows = load_jsonl_conversations(train_file, images, skip_log_for(args))
    eval_rows = jsonl_eval_examples(val_file, images, skip_log_for(args))
    train_set = RecipeDataset(first_rows(train_rows, data_args.max_train_samples), name="ucf101 train", data_files=[train_file])
    eval_set = RecipeDataset(first_rows(eval_rows, data_args.max_eval_samples), name="ucf101 val", for_training=False, data_files=[val_file])

    processor = load_processor(args.model_name_or_path, args.num_crops)
    run_folder.claim(train_set)
    run_folder.clear_interrupted_checkpoints()
    train_set = check_training_data(train_set, processor, args, run_folder)
    eval_set = check_evaluation_data(eval_set, processor, args)
    if data_args.eval_on_test:
        test_rows = jsonl_eval_examples(split_file(data_dir, "test"), images, skip_log_for(args))
        test_set = check_evaluation_data(RecipeDataset(test_rows, name="ucf101 test", for_training=False), processor, args)
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
    if data_args.eval_on_test:
        evaluations["test"] = evaluate_after(processor, test_set, METRIC, args, "eval_test.json")
    finish(args, run_folder, log_history, evaluations)


if __name__ == "__main__":
    main()
