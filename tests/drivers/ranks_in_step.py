"""Two ranks under ZeRO-3 where rank 0 trains on text-only batches and rank 1 on image batches, in full and then
frozen-vision mode, through the recipes' own path (FinetuneArguments, load_model under zero.Init, RecipeTrainer).
Used by tests/test_ranks_in_step.py:

    torchrun --nproc_per_node=2 tests/drivers/ranks_in_step.py TINY_CHECKPOINT OUT_DIR

Each rank prints every step's batch before its forward and once its optimizer step is done, so a hang shows where
the ranks parted; at the end each writes OUT_DIR/rank{R}.json: per mode, the batch kinds it trained on and how many
times its vision-tower layers ran.
"""

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import torch.distributed as dist  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from common.data.collator import Phi3VCollator  # noqa: E402
from common.training.arguments import parse_args  # noqa: E402
from common.training.model_setup import load_processor  # noqa: E402
from common.training.recipe import RecipeTrainer, load_model_to_train  # noqa: E402

STEPS = 2
TEXT = {"images": [], "messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]}
IMAGE = {
    "images": [Image.new("RGB", (60, 40), (200, 0, 0))],
    "messages": [{"role": "user", "content": "<|image_1|>\nWhat colour?"}, {"role": "assistant", "content": "red"}],
}
# Sequential sampling deals one-example batches to the ranks in turn: even rows to rank 0, odd rows to rank 1.
ROWS = [TEXT, IMAGE] * STEPS


def report(message: str) -> None:
    print(f"[rank {dist.get_rank()}] {message}", flush=True)


class ObservedTrainer(RecipeTrainer):
    mode = ""

    def training_step(self, model, inputs, num_items_in_batch=None):
        kind = "image" if "pixel_values" in inputs else "text-only"
        self.kinds.append(kind)
        report(f"{self.mode} step {self.state.global_step + 1}: {kind} batch, forward and backward")
        return super().training_step(model, inputs, num_items_in_batch)


class StepDone(TrainerCallback):
    def __init__(self, mode: str):
        self.mode = mode

    def on_step_end(self, args, state, control, **kwargs):
        report(f"{self.mode} step {state.global_step} done")


def train(mode: str, flags: list[str], checkpoint: str, out: Path) -> dict:
    args, = parse_args(argv=[
        "--model_name_or_path", checkpoint, "--output_dir", str(out / mode), "--deepspeed", str(REPO_ROOT / "ds_configs" / "zero3.json"),
        "--num_crops", "1", "--batch_size", "2", "--batch_size_per_gpu", "1", "--max_steps", str(STEPS),
        "--train_sampling_strategy", "sequential", "--save_strategy", "no", "--dataloader_num_workers", "0",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--disable_tqdm", "true", *flags,
    ])
    processor = load_processor(args.model_name_or_path, args.num_crops)
    model = load_model_to_train(args)
    calls = []
    for layer in model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers:
        layer.register_forward_hook(lambda *_: calls.append(1))
    trainer = ObservedTrainer(model=model, args=args, train_dataset=ROWS, data_collator=Phi3VCollator(processor),
                              processing_class=processor, callbacks=[StepDone(mode)])
    trainer.mode, trainer.kinds = mode, []
    trainer.train()
    report(f"{mode} finished")
    return {"kinds": trainer.kinds, "tower_calls": len(calls)}


def main() -> None:
    checkpoint, out = sys.argv[1], Path(sys.argv[2])
    results = {mode: train(mode, flags, checkpoint, out) for mode, flags in (("full", []), ("frozen_vision", ["--freeze_vision_model"]))}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
