"""--torch_compile compiles each decoder and CLIP layer (common/training/compile.py): no graph break, the eager numbers.

The aot_eager backend traces exactly what inductor would compile (dynamo's graphs, AOTAutograd's forward and
backward) without generating kernels, so breaks and numerics are checked in seconds; bench/bench_compile.py
measures inductor itself.
"""

import pytest
import torch
import torch._dynamo
from accelerate.utils import DynamoBackend
from PIL import Image
from torch._dynamo.utils import counters

from common.data.collator import Phi3VCollator, Phi3VGenerationCollator
from common.training.arguments import parse_args
from common.training.model_setup import load_model, load_processor
from common.training.recipe import RecipeTrainer, load_model_to_train

IMAGE_EXAMPLE = {
    "images": [Image.new("RGB", (500, 300), (200, 30, 30))],
    "messages": [{"role": "user", "content": "<|image_1|>\nWhat colour?"}, {"role": "assistant", "content": "red"}],
}
TEXT_EXAMPLE = {"messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]}


def parse(checkpoint, output_dir, *flags):
    args, = parse_args(argv=["--model_name_or_path", str(checkpoint), "--output_dir", str(output_dir), "--deepspeed", "none",
                             "--num_crops", "4", "--batch_size", "2", "--batch_size_per_gpu", "2", *flags])
    return args


def training_step(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_compiled_layers_train_without_graph_breaks_and_with_the_eager_numbers(tiny_checkpoint, tmp_path):
    args = parse(tiny_checkpoint, tmp_path, "--torch_compile_backend", "aot_eager")
    assert args.compile_layers == {"backend": "aot_eager", "mode": None}
    # The Trainer (through accelerate) would otherwise compile the whole model around the compiled layers.
    assert not args.torch_compile and args.torch_compile_backend is None
    processor = load_processor(args.model_name_or_path, args.num_crops)
    collate = Phi3VCollator(processor)
    batches = {"images and text": collate([IMAGE_EXAMPLE, TEXT_EXAMPLE]), "text only": collate([TEXT_EXAMPLE])}
    models = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        model = load_model(args.model_name_or_path, **args.model_loading()) if not compiled else load_model_to_train(args)
        # As the Trainer enables it for the recipes' default --activation_checkpointing.
        model.activation_checkpointing_enable(args.activation_checkpointing_kwargs)
        models[name] = model.train()

    torch._dynamo.reset()
    counters.clear()
    for name, batch in batches.items():
        eager_loss, eager_grads = training_step(models["eager"], batch)
        loss, grads = training_step(models["compiled"], batch)
        torch.testing.assert_close(loss, eager_loss, rtol=0, atol=1e-6, msg=name)
        assert grads.keys() == eager_grads.keys()
        for parameter, grad in grads.items():
            torch.testing.assert_close(grad, eager_grads[parameter], rtol=1e-5, atol=1e-7, msg=f"{name}: {parameter}")
    assert dict(counters["graph_break"]) == {}
    # Two layer classes, each traced whole: its first shape, then dynamic shapes (and the 1-crop dummy image of
    # the text-only batch), shared by every layer of the class.
    assert counters["frames"]["ok"] == counters["frames"]["total"] >= 2

    frames = counters["frames"]["total"]
    generation = Phi3VGenerationCollator(processor)
    prompt = {"id": "p", "references": ["red"], "images": IMAGE_EXAMPLE["images"], "messages": IMAGE_EXAMPLE["messages"][:1]}
    inputs, _ = generation([prompt])
    settings = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    answers = [model.eval().generate(**inputs, **settings) for model in models.values()]
    assert torch.equal(answers[0], answers[1])
    assert counters["frames"]["total"] == frames, "generation runs the layers eagerly"

    trainer = RecipeTrainer(model=models["compiled"], args=args, processing_class=processor, data_collator=collate)
    assert trainer.accelerator.state.dynamo_plugin.backend == DynamoBackend.NO


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--torch_compile_backend", "nope"], "--torch_compile_backend nope is not a torch.compile backend"),
        (["--torch_compile_backend", "aot_eager", "--torch_compile_mode", "max-autotune"], "the aot_eager backend ignores"),
        (["--torch_compile_mode", "fastest"], "--torch_compile_mode fastest is not an inductor mode"),
        (["--torch_compile", "--deepspeed", "ds_configs/zero3.json"], "--torch_compile with ZeRO-3"),
    ],
)
def test_compile_settings_that_cannot_work_are_refused(tmp_path, capsys, flags, reason):
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv=["--output_dir", str(tmp_path), "--use_lora", *flags])
    assert stopped.value.code == 2
    assert reason in capsys.readouterr().err
