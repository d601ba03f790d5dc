"""Checks that need a CUDA GPU: flash attention and Liger kernels against the reference paths. Skipped on CPU."""

import importlib.util

import pytest
import torch

from common import Phi3VForCausalLM

from .test_modeling import random_example

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
    from common.training import apply_liger_kernels

    example = random_example([(1, 1)])
    plain = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).cuda().eval()
    expected, _ = loss_and_logits(plain.bfloat16(), example)
    fused = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).cuda().eval()
    apply_liger_kernels(fused)
    actual, _ = loss_and_logits(fused.bfloat16(), example)
    torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-2)
