"""Precision and sampling rules at parse time, on CPU, with a GPU faked where the rule is about GPUs.

The GPU rule (fp16 mixed precision unless --bf16 or --fp32) is checked by parsing with `cuda_available` faked;
what the log states is checked against what the Trainer, DeepSpeed's config and the loaded model really hold.
"""

import dataclasses
import logging

import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler
from transformers import Trainer, TrainingArguments
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
from transformers.trainer_pt_utils import LengthGroupedSampler

import common.training.arguments
from common.data.dataset import RecipeDataset
from common.fixtures.synthetic import make_docvqa
from common.training.arguments import DEFAULT_DEEPSPEED_CONFIG, TRAIN_SAMPLING_STRATEGIES, Precision, parse_args
from common.training.model_setup import load_model, load_processor
from common.training.recipe import RecipeTrainer, load_model_to_train
from finetune_hf_trainer_docvqa import mini_train_example

from .recipe_utils import parse_refusal

FP16_AMP = Precision("float32", "float16 (autocast)", "float32", "dynamic")
BF16 = Precision("bfloat16", "bfloat16 (autocast)", "none", "none")
FP32 = Precision("float32", "float32", "none", "none")


@pytest.fixture
def gpu(monkeypatch):
    """Parse as on a CUDA GPU with bf16 (an A100): our device check, and the Trainer's own bf16 check."""
    monkeypatch.setattr(common.training.arguments, "cuda_available", lambda: True)
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda *args, **kwargs: True)


def parse(tmp_path, *flags, model="does-not-exist"):
    args, = parse_args(argv=["--model_name_or_path", str(model), "--output_dir", str(tmp_path), "--deepspeed", "none", *flags])
    return args


def refusal(tmp_path, capsys, *flags) -> str:
    return parse_refusal(capsys, parse, tmp_path, *flags)


@pytest.mark.parametrize(
    "flags, mixed_precision, precision",
    [
        ([], "fp16", FP16_AMP),
        (["--fp16"], "fp16", FP16_AMP),
        (["--fp32"], "no", FP32),
        (["--bf16"], "bf16", BF16),
        (["--use_lora"], "fp16", Precision("float32, LoRA adapters float32", "float16 (autocast)", "float32", "dynamic")),
        (["--use_lora", "--bf16"], "bf16", Precision("bfloat16, LoRA adapters float32", "bfloat16 (autocast)", "float32", "none")),
        (["--use_qlora"], "fp16",
         Precision("nf4 4-bit linear layers, float32 elsewhere, LoRA adapters float32", "float16 (autocast)", "float32", "dynamic")),
    ],
)
def test_gpu_precision(gpu, tmp_path, flags, mixed_precision, precision):
    args = parse(tmp_path, *flags)
    assert args.precision() == precision
    # What the Trainer is given: fp16=True on fp32 weights is fp16 autocast with a GradScaler on CUDA.
    assert args.mixed_precision == mixed_precision and not args.use_cpu
    assert (args.fp16, args.bf16) == (mixed_precision == "fp16", mixed_precision == "bf16")
    assert args.model_dtype == (torch.bfloat16 if args.bf16 else torch.float32)


class CapturedLoad(Exception):
    pass


def test_gpu_qlora_without_flags_computes_in_fp16_on_fp32_weights(gpu, tmp_path, monkeypatch):
    def capture(source, **kwargs):
        raise CapturedLoad(kwargs)

    monkeypatch.setattr("common.training.model_setup.Phi3VForCausalLM.from_pretrained", capture)
    with pytest.raises(CapturedLoad) as load:
        args = parse(tmp_path, "--use_qlora")
        load_model(args.model_name_or_path, **args.model_loading())
    kwargs = load.value.args[0]
    assert kwargs["quantization_config"].bnb_4bit_compute_dtype == torch.float16
    assert kwargs["dtype"] == torch.float32


@pytest.mark.parametrize("flags, precision", [([], FP32), (["--fp32"], FP32), (["--bf16"], BF16)])
def test_cpu_precision(tmp_path, flags, precision):
    args = parse(tmp_path, *flags)
    assert args.use_cpu and not args.fp16
    assert args.precision() == precision


@pytest.mark.parametrize(
    "on_gpu, flags, reason",
    [
        (False, ["--fp16"], "--fp16 needs a CUDA GPU"),
        (False, ["--use_qlora"], "--use_qlora on CPU needs --bf16"),
        (True, ["--use_qlora", "--fp32"], "--use_qlora contradicts --fp32"),
        (True, ["--use_flash_attention"], "--use_flash_attention needs --bf16"),
        (True, ["--attn_implementation", "flash_attention_2"], "flash_attention_2 needs --bf16"),
        (True, ["--bf16", "--fp16"], "exclude each other"),
        (True, ["--fp16", "--fp32"], "exclude each other"),
        (False, ["--bf16", "--fp32"], "exclude each other"),
    ],
)
def test_impossible_precision_is_refused_at_parse_time(request, tmp_path, capsys, on_gpu, flags, reason):
    if on_gpu:
        request.getfixturevalue("gpu")
    assert reason in refusal(tmp_path, capsys, *flags)


def with_deepspeed(args, config):
    """What TrainingArguments does with --deepspeed, without the process group a real parse would start."""
    args.deepspeed = config
    args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(config)
    args.hf_deepspeed_config.trainer_config_process(args)
    return args


@pytest.mark.parametrize(
    "flags, precision",
    [
        ([], Precision("float16 (DeepSpeed)", "float16", "float32 (DeepSpeed)", "dynamic")),
        (["--bf16"], Precision("bfloat16 (DeepSpeed)", "bfloat16", "float32 (DeepSpeed)", "none")),
        (["--fp32"], FP32),
    ],
)
def test_deepspeed_precision_follows_the_flags(gpu, tmp_path, flags, precision):
    args = with_deepspeed(parse(tmp_path, *flags), str(DEFAULT_DEEPSPEED_CONFIG))
    assert args.precision() == precision


def test_deepspeed_static_loss_scale_is_stated(gpu, tmp_path):
    config = {"fp16": {"enabled": "auto", "loss_scale": 128}, "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}
    assert with_deepspeed(parse(tmp_path), config).precision().loss_scaling == "static (128)"


@pytest.mark.parametrize(
    "on_gpu, flags",
    [(False, ["--bf16"]), (False, ["--use_lora"]), (False, ["--use_lora", "--bf16"]), (False, ["--use_qlora", "--bf16"]), (True, ["--use_lora"])],
)
def test_the_logged_precision_is_what_the_model_holds(request, tiny_checkpoint, tmp_path, caplog, on_gpu, flags):
    if on_gpu:
        request.getfixturevalue("gpu")
    args = parse(tmp_path, *flags, model=tiny_checkpoint)
    with caplog.at_level(logging.INFO, logger="common.training"):
        model = load_model_to_train(args)
    messages = [record.getMessage() for record in caplog.records if record.name in ("common.training.recipe", "common.training.model_setup")]
    precision = args.precision()
    assert messages[0] == str(precision) and messages[1].startswith("training mode:")
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    if args.use_lora:
        assert trained == {torch.float32}, "LoRA adapters train in fp32"
        assert frozen == {args.model_dtype, *([torch.uint8] if args.use_qlora else [])}
    else:
        assert trained == {args.model_dtype} and not frozen
    assert precision.master_weights == ("float32" if args.compute_dtype != torch.float32 and torch.float32 in trained else "none")


@pytest.mark.parametrize("flags, autocast", [(["--bf16"], True), ([], False)])
def test_cpu_bf16_trains_under_cpu_autocast(tiny_checkpoint, tmp_path, flags, autocast):
    args = parse(tmp_path, *flags, model=tiny_checkpoint)
    accelerator = Trainer(model=load_model(args.model_name_or_path, **args.model_loading()), args=args).accelerator
    assert accelerator.native_amp is autocast and accelerator.scaler is None
    assert accelerator.mixed_precision == ("bf16" if autocast else "no")


SAMPLING_CHOICES = next(f for f in dataclasses.fields(TrainingArguments) if f.name == "train_sampling_strategy").metadata["choices"]
SAMPLERS = {"random": RandomSampler, "sequential": SequentialSampler, "group_by_length": LengthGroupedSampler}


def test_every_supported_sampling_strategy_has_its_sampler():
    assert set(TRAIN_SAMPLING_STRATEGIES) == set(SAMPLERS) and set(SAMPLERS) < set(SAMPLING_CHOICES)


@pytest.mark.parametrize("strategy", SAMPLING_CHOICES)
def test_every_sampling_strategy_works_or_is_refused_at_parse_time(tiny_checkpoint, tmp_path, capsys, strategy):
    flags = ["--train_sampling_strategy", strategy, "--num_crops", "1"]
    if strategy not in SAMPLERS:
        assert f"--train_sampling_strategy {strategy} is not supported" in refusal(tmp_path, capsys, *flags)
        return
    args = parse(tmp_path, *flags, model=tiny_checkpoint)
    dataset = RecipeDataset(make_docvqa(n=4)["train"], mini_train_example, "docvqa train")
    trainer = RecipeTrainer(model=load_model(args.model_name_or_path, **args.model_loading()), args=args, train_dataset=dataset, processing_class=load_processor(args.model_name_or_path, args.num_crops))
    sampler = trainer.train_sampler()
    assert type(sampler) is SAMPLERS[strategy] and len(sampler) == len(dataset)
