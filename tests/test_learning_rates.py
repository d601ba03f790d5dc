"""--vision_learning_rate and --projection_learning_rate: the optimizer groups, the scheduler and resume, in process."""

import copy

import pytest
import torch
from PIL import Image
from transformers import Trainer, TrainerCallback

from common.data.collator import Phi3VCollator
from common.training.arguments import parse_args
from common.training.model_setup import load_processor
from common.training.recipe import RecipeTrainer, load_model_to_train
from common.training.run_folder import RunFolder, RunFolderError

RATES = {"decoder": 4e-3, "vision tower": 1e-3, "projection": 2e-3}
PART_FLAGS = ["--learning_rate", "4e-3", "--vision_learning_rate", "1e-3", "--projection_learning_rate", "2e-3"]
TOWER = "model.vision_embed_tokens.img_processor."
PROJECTION = "model.vision_embed_tokens."
EXAMPLES = [
    {"id": f"row-{index}", "images": [Image.new("RGB", (60, 40), (60 * index, 0, 200))],
     "messages": [{"role": "user", "content": "<|image_1|>\nWhat colour?"}, {"role": "assistant", "content": f"colour {index}"}]}
    for index in range(4)
]


def parse(checkpoint, output_dir, *flags):
    args, = parse_args(argv=["--model_name_or_path", str(checkpoint), "--output_dir", str(output_dir), "--deepspeed", "none",
                             "--num_crops", "1", "--dataloader_num_workers", "0", "--batch_size", "2", "--batch_size_per_gpu", "2",
                             "--wd", "0.1", "--warmup_steps", "0", "--save_steps", "1", "--logging_steps", "1", "--disable_tqdm", "true",
                             *PART_FLAGS, *flags])
    return args


def trainer_for(args, **kwargs):
    model = load_model_to_train(args)
    processor = load_processor(args.model_name_or_path, args.num_crops)
    return RecipeTrainer(model=model, args=args, processing_class=processor, data_collator=Phi3VCollator(processor), **kwargs)


def expected_part(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    if name.startswith(TOWER):
        return "vision tower"
    return "projection" if name.startswith(PROJECTION) else "decoder"


def grouped_names(trainer) -> dict[tuple, set[str]]:
    """{(part, lr, weight decay): parameter names} of the trainer's optimizer."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {(g["part"], g["lr"], g["weight_decay"]): {names[id(p)] for p in g["params"]} for g in trainer.optimizer.param_groups}


def test_full_mode_groups_are_part_by_decay(tiny_checkpoint, tmp_path, caplog):
    trainer = trainer_for(parse(tiny_checkpoint, tmp_path))
    with caplog.at_level("INFO", logger="common.training.optimizer"):
        trainer.create_optimizer()
    groups = grouped_names(trainer)
    assert list(groups) == [(part, RATES[part], wd) for part in RATES for wd in (0.1, 0.0)]
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert sum(map(len, groups.values())) == len(trainable) and set().union(*groups.values()) == trainable
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    for (part, _, wd), names in groups.items():
        assert all(expected_part(n) == part and (n in decay) == (wd > 0) for n in names)
    spots = {
        "model.layers.0.self_attn.qkv_proj.weight": ("decoder", 0.1), "model.embed_tokens.weight": ("decoder", 0.1),
        "lm_head.weight": ("decoder", 0.1), "model.norm.weight": ("decoder", 0.0),
        "model.layers.1.post_attention_layernorm.weight": ("decoder", 0.0),
        TOWER + "vision_model.encoder.layers.0.mlp.fc1.weight": ("vision tower", 0.1),
        TOWER + "vision_model.encoder.layers.0.mlp.fc1.bias": ("vision tower", 0.0),
        # A LayerNorm by its type, whatever its name says.
        TOWER + "vision_model.pre_layrnorm.weight": ("vision tower", 0.0),
        PROJECTION + "glb_GN": ("projection", 0.1), PROJECTION + "img_projection.0.weight": ("projection", 0.1),
        PROJECTION + "img_projection.2.bias": ("projection", 0.0),
    }
    for name, (part, wd) in spots.items():
        assert name in groups[part, RATES[part], wd], name
    table = caplog.text
    assert "learning rate per part" in table and "vision tower" in table and "0.001" in table and "0.002" in table


def test_lora_adapters_take_the_rate_of_the_layer_they_adapt(tiny_checkpoint, tmp_path):
    trainer = trainer_for(parse(tiny_checkpoint, tmp_path, "--use_lora", "--lora_rank", "2"))
    trainer.create_optimizer()
    groups = grouped_names(trainer)
    # Adapters are all weights (decay); the frozen base is in no group.
    assert list(groups) == [(part, RATES[part], 0.1) for part in RATES]
    for (part, _, _), names in groups.items():
        assert names and all(".lora_" in n and expected_part(n) == part for n in names)
    assert any(".self_attn.q_proj.lora_A." in n for n in groups["vision tower", 1e-3, 0.1])
    assert any(".img_projection.0.lora_B." in n for n in groups["projection", 2e-3, 0.1])
    assert any("lm_head.lora_A." in n for n in groups["decoder", 4e-3, 0.1])


def test_one_rate_keeps_the_trainers_two_groups(tiny_checkpoint, tmp_path):
    args = parse(tiny_checkpoint, tmp_path, "--vision_learning_rate", "4e-3", "--projection_learning_rate", "4e-3")
    trainer = trainer_for(args)
    ours = trainer.create_optimizer().param_groups
    trainer.optimizer = None
    stock = Trainer.create_optimizer(trainer).param_groups
    assert [(len(g["params"]), g["weight_decay"], g["lr"]) for g in ours] == [(len(g["params"]), g["weight_decay"], g["lr"]) for g in stock]
    assert len(ours) == 2 and "part" not in ours[0]


def test_the_schedule_scales_every_group_by_the_same_factor(tiny_checkpoint, tmp_path):
    trainer = trainer_for(parse(tiny_checkpoint, tmp_path, "--warmup_steps", "4", "--lr_scheduler_type", "cosine"))
    trainer.create_optimizer_and_scheduler(num_training_steps=20)
    for step in range(1, 7):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        factors = {g["lr"] / RATES[g["part"]] for g in trainer.optimizer.param_groups}
        assert len(factors) == 1 and 0 < factors.pop() <= 1
        if step == 2:
            assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(RATES["decoder"] / 2), "half-way through warm-up"


class Snapshot(TrainerCallback):
    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.optimizer, self.scheduler = copy.deepcopy(optimizer.state_dict()), lr_scheduler.state_dict()


def test_resume_restores_each_groups_state_and_refuses_other_rates(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    first = trainer_for(parse(tiny_checkpoint, out, "--max_steps", "2"), train_dataset=EXAMPLES)
    first.train()
    checkpoint = out / "checkpoint-1"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert [(g["part"], g["initial_lr"]) for g in saved["param_groups"]] == [(part, RATES[part]) for part in RATES for _ in (0, 1)]

    snapshot = Snapshot()
    second = trainer_for(parse(tiny_checkpoint, out, "--max_steps", "2", "--resume_from_checkpoint", str(checkpoint)),
                         train_dataset=EXAMPLES, callbacks=[snapshot])
    second.train(resume_from_checkpoint=str(checkpoint))
    assert [{k: v for k, v in g.items() if k != "params"} for g in snapshot.optimizer["param_groups"]] == \
           [{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]]
    assert snapshot.optimizer["state"].keys() == saved["state"].keys()
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(snapshot.optimizer["state"][index][key], value), (index, key)
    assert snapshot.scheduler["base_lrs"] == [RATES[part] for part in RATES for _ in (0, 1)] and snapshot.scheduler["last_epoch"] == 1
    # The resumed step 2 is the uninterrupted run's step 2, bit for bit.
    for (name, a), b in zip(first.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), name

    other = parse(tiny_checkpoint, out, "--max_steps", "2", "--resume_from_checkpoint", "latest", "--vision_learning_rate", "5e-4")
    folder = RunFolder(other)
    folder.lock()
    with pytest.raises(RunFolderError, match=r"trained with other settings \(vision_learning_rate 0\.001 -> 0\.0005\)"):
        folder.claim(EXAMPLES)


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--vision_learning_rate", "0"], "--vision_learning_rate must be positive"),
        (["--projection_learning_rate", "1e-5", "--freeze_vision_model"], "--freeze_vision_model freezes"),
        (["--vision_learning_rate", "1e-5", "--use_lora", "--freeze_vision_model"], "--freeze_vision_model freezes"),
    ],
)
def test_rates_that_cannot_apply_are_refused(tmp_path, capsys, flags, reason):
    with pytest.raises(SystemExit):
        parse_args(argv=["--output_dir", str(tmp_path), "--deepspeed", "none", *flags])
    assert reason in capsys.readouterr().err


def test_a_deepspeed_config_with_its_own_scheduler_is_refused(tmp_path, capsys):
    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}')
    with pytest.raises(SystemExit):
        parse_args(argv=["--output_dir", str(tmp_path), "--deepspeed", str(config), "--vision_learning_rate", "1e-5"])
    assert "has its own (scheduler section)" in capsys.readouterr().err
