"""Fine-tune Phi-3.5-vision on NLVR2 (two images per prompt) and score its accuracy before and after training.

Data: the Cauldron's `nlvr2` config (~50k image pairs, several true/false statements each). The first 500
rows are held out for evaluation (their first statement is scored, as in the reference recipe); each
training row is one multi-turn conversation over all its statements, both images in the first prompt
(`<|image_1|><|image_2|>\\n{statement}`). `--dataset_path DIR` reads the same schema from a local folder.

Launch commands (one node with 8 GPUs; multi-node: add `--nnodes N --node_rank R --rdzv_backend c10d
--rdzv_endpoint HOST:PORT` to torchrun):

    # full fine-tuning, DeepSpeed ZeRO-2 (the default for this mode)
    torchrun --nproc_per_node=8 finetune_hf_trainer_nlvr2.py --bf16 --use_flash_attention \
        --learning_rate 1e-5 --num_train_epochs 3 --output_dir ./output/nlvr2-full
    # frozen vision tower
    torchrun --nproc_per_node=8 finetune_hf_trainer_nlvr2.py --bf16 --use_flash_attention \
        --freeze_vision_model --learning_rate 2e-5 --num_train_epochs 2 --output_dir ./output/nlvr2-frozen
    # LoRA and QLoRA
    torchrun --nproc_per_node=8 finetune_hf_trainer_nlvr2.py --bf16 --use_flash_attention \
        --use_lora --learning_rate 2e-4 --output_dir ./output/nlvr2-lora
    torchrun --nproc_per_node=8 finetune_hf_trainer_nlvr2.py --bf16 --use_flash_attention \
        --use_qlora --learning_rate 2e-4 --output_dir ./output/nlvr2-qlora

    # CPU smoke test, no downloads
    python -m common.tiny --out ./tiny-phi3v
    python -m common.synthetic nlvr2 --out ./data/nlvr2-synthetic
    torchrun --nproc_per_node=2 finetune_hf_trainer_nlvr2.py --model_name_or_path ./tiny-phi3v \
        --dataset_path ./data/nlvr2-synthetic --num_eval_rows 8 --num_crops 1 --batch_size 4 \
        --batch_size_per_gpu 2 --max_steps 4 --dataloader_num_workers 0 --output_dir ./output/nlvr2-smoke
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.data.dataset import RecipeDataset
from common.data.sources import cauldron_eval_example, cauldron_train_example, first_rows, load_split, split_head
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

CAULDRON = "HuggingFaceM4/the_cauldron"
METRIC = "accuracy"


@dataclass
class NLVR2Arguments:
    dataset_path: str | None = field(default=None, metadata={"help": "Local copy of the Cauldron nlvr2 schema."})
    num_eval_rows: int = field(default=500, metadata={"help": "Rows held out from the head of the data for evaluation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N training rows only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N held-out rows only."})


@stop_signals_end_the_run
@exit_on_bad_input
def main(argv: list[str] | None = None) -> None:
    set_launcher_environment(argv)
    args, data_args = parse_args(NLVR2Arguments, argv=argv, defaults={"max_new_tokens": 16}, metric=METRIC)
    setup_logging(args)
    run_folder = RunFolder(args)
    run_folder.lock()
    run_folder.move_previous_run_aside()

    eval_rows, train_rows = split_head(load_split(CAULDRON, "nlvr2", "train", data_args.dataset_path), data_args.num_eval_rows)
    train_set = RecipeDataset(first_rows(train_rows, data_args.max_train_samples), cauldron_train_example, "nlvr2 train")
    eval_set = RecipeDataset(first_rows(eval_rows, data_args.max_eval_samples), cauldron_eval_example, "nlvr2 eval", for_training=False)

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
