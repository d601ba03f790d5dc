"""Checks that need a CUDA GPU: flash attention and Liger kernels against the reference paths, and --fsdp through
the Trainer (accelerate runs FSDP on GPUs only). Skipped on CPU."""

import importlib.util
import json

import pytest
import torch

from common import Phi3VForCausalLM

from .recipe_utils import assert_ok, read_eval, run_script, weights
from .test_modeling import pad_batch, random_example
from .test_recipe_docvqa import SCRIPT, VISION, base_args, changed, predictions

pytestmark = pytest.mark.gpu


def loss_and_logits(model, example):
    ids, pixel_values, image_sizes = example
    labels = ids.clone()
    labels[:-4] = -100
    batch = dict(input_ids=ids[None].cuda(), pixel_values=pixel_values.cuda().bfloat16(), image_sizes=image_sizes.cuda())
    with torch.no_grad():
        loss = model(**batch, labels=labels[None].cuda()).loss
        logits = model(**batch).logits
    return loss, logits


def test_sdpa_bf16_on_gpu_matches_eager(tiny_checkpoint):
    example = random_example([(1, 2)])
    results = {}
    for impl in ("sdpa", "eager"):
        model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16, attn_implementation=impl).cuda().eval()
        results[impl] = loss_and_logits(model, example)
    torch.testing.assert_close(results["sdpa"][0], results["eager"][0], rtol=2e-2, atol=2e-2)


def test_right_padded_bf16_batch_without_mask_matches_single_examples(tiny_checkpoint):
    """On CUDA the dropped padding mask sends sdpa to its flash kernel; the loss must not change."""
    examples = [random_example([(1, 2)], seed=1), random_example([(1, 1)], prefix=(5,) * 40, seed=2)]
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).cuda().eval()
    input_ids, attention_mask, pixel_values, image_sizes = pad_batch(examples, "right")
    labels = torch.where(attention_mask.bool() & (input_ids >= 0), input_ids, -100)
    labels[:, :3] = -100
    assert model.padding_mask_is_redundant(attention_mask.cuda(), None)
    with torch.no_grad():
        batch_loss = model(
            input_ids=input_ids.cuda(), attention_mask=attention_mask.cuda(), pixel_values=pixel_values.cuda().bfloat16(),
            image_sizes=image_sizes.cuda(), labels=labels.cuda(), num_items_in_batch=1,
        ).loss
        single_losses = []
        for row, (ids, pv, sz) in enumerate(examples):
            single_losses.append(model(
                input_ids=ids[None].cuda(), pixel_values=pv.cuda().bfloat16(), image_sizes=sz.cuda(),
                labels=labels[row, : len(ids)][None].cuda(), num_items_in_batch=1,
            ).loss)
    torch.testing.assert_close(batch_loss, sum(single_losses), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
def test_flash_attention_matches_sdpa(tiny_checkpoint):
    example = random_example([(1, 2)])
    results = {}
    for impl in ("sdpa", "flash_attention_2"):
        model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16, attn_implementation=impl).cuda().eval()
        results[impl] = loss_and_logits(model, example)
    torch.testing.assert_close(results["flash_attention_2"][0], results["sdpa"][0], rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")
def test_liger_kernels_keep_the_loss(tiny_checkpoint):
    from common.training.model_setup import apply_liger_kernels

    example = random_example([(1, 1)])
    plain = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).cuda().eval()
    expected, _ = loss_and_logits(plain.bfloat16(), example)
    fused = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).cuda().eval()
    apply_liger_kernels(fused)
    actual, _ = loss_and_logits(fused.bfloat16(), example)
    torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-2)


def test_fsdp_trains_saves_evaluates_and_resumes_through_the_trainer(tiny_checkpoint, tmp_path):
    """The DocVQA recipe with --fsdp on up to 2 GPUs (1 GPU: a plain `python` process, as without a launcher):
    accelerate's FSDP2 trains, every save is the official format, evaluation during training generates with the
    sharded model as a fresh load of the saved one does, and a run stopped at step 2 resumes to the weights of
    an uninterrupted one. fp32, so that the runs compare closely."""
    from common.fixtures.synthetic import make_docvqa

    data = tmp_path / "docvqa"
    make_docvqa(n=12, seed=0).save_to_disk(str(data))
    nproc = min(2, torch.cuda.device_count())
    flags = ["--fsdp", "--fp32", "--batch_size", str(2 * nproc), "--max_steps", "4", "--save_steps", "2",
             "--eval_strategy", "steps", "--eval_steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(run_script(SCRIPT, base_args(tiny_checkpoint, data, straight, *flags), tmp_path, nproc=nproc))
    checkpoint = straight / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file() and (checkpoint / "optimizer.bin").is_file(), "accelerate ran FSDP"
    before, after = weights(tiny_checkpoint / "model.safetensors"), weights(straight / "model.safetensors")
    assert set(after) == set(before) and all(after[k].shape == before[k].shape for k in after), "whole tensors, the base's names"
    assert set(weights(checkpoint / "model.safetensors")) <= set(before)
    assert changed(before, after, "model.layers.") and changed(before, after, VISION)
    assert json.loads((straight / "config.json").read_text())["architectures"] == ["Phi3VForCausalLM"]
    assert set(Phi3VForCausalLM.from_pretrained(straight).state_dict()) <= set(after)
    # 3 evaluation examples on 2 GPUs: the sharded model generates in sync, one rank with a filler.
    assert predictions(straight, "step4") == predictions(straight, "after")
    read_eval(straight, "before")

    stopped = run_script(SCRIPT, base_args(tiny_checkpoint, data, resumed, *flags), tmp_path, nproc=nproc, env={"PHI3V_TEST_STOP_AT_STEP": 2})
    assert_ok(stopped)
    again = run_script(SCRIPT, base_args(tiny_checkpoint, data, resumed, *flags, "--resume_from_checkpoint", "latest"), tmp_path, nproc=nproc)
    assert_ok(again)
    assert "resuming from" in again.stderr + again.stdout
    final = weights(resumed / "model.safetensors")
    for name in after:
        torch.testing.assert_close(final[name], after[name], rtol=0, atol=1e-4, msg=name)
