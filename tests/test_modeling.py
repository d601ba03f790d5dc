"""The native model against the facts of spec sections 1, 2 and 4, on a tiny random checkpoint."""

import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers.utils import logging as hf_logging

from common import Phi3VConfig, Phi3VForCausalLM
from common.fixtures.tiny import TINY_VISION, official_config_dict
from common.model.modeling_phi3v import Phi3VImageEmbedding
from common.model.official_files import TOWER_PREFIX

from .conftest import REPO_ROOT

TOWER = "model.vision_embed_tokens.img_processor.vision_model."


def image_tokens(h: int, w: int) -> int:
    return (h * w + 1) * 144 + 1 + (h + 1) * 12


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    torch.manual_seed(0)
    return Phi3VForCausalLM.from_pretrained(tiny_checkpoint).eval()


def random_example(grids, prefix=(5, 6), suffix=(7, 8, 9), seed=0):
    """input_ids with one placeholder run per image (official -k convention) and matching pixel values."""
    generator = torch.Generator().manual_seed(seed)
    ids = [1, 32010, *prefix]
    for k, (h, w) in enumerate(grids, start=1):
        ids += [-k] * image_tokens(h, w) + [1, 100 + k]
    ids += [*suffix, 32007, 32001]
    pixel_values = torch.zeros(len(grids), 5, 3, 336, 336)
    for i, (h, w) in enumerate(grids):
        pixel_values[i, : 1 + h * w] = torch.randn(1 + h * w, 3, 336, 336, generator=generator)
    sizes = torch.tensor([[336 * h, 336 * w] for h, w in grids], dtype=torch.long).reshape(-1, 2)
    return torch.tensor(ids), pixel_values, sizes


def pad_batch(examples, side="right", pad_id=32000):
    width = max(len(ids) for ids, _, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    attention_mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, (ids, _, _) in enumerate(examples):
        span = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
        input_ids[row, span] = ids
        attention_mask[row, span] = 1
    pixel_values = torch.cat([pv for _, pv, _ in examples])
    image_sizes = torch.cat([sz for _, _, sz in examples])
    return input_ids, attention_mask, pixel_values, image_sizes


def test_loads_official_layout_and_matches_file(tiny_checkpoint, caplog):
    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        loaded = Phi3VForCausalLM.from_pretrained(tiny_checkpoint)
    hf_logging.disable_propagation()
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower() or "missing" in r.getMessage().lower()]
    state = loaded.state_dict()
    with safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as f:
        file_keys = set(f.keys())
        for name, tensor in state.items():
            assert torch.equal(tensor, f.get_tensor(name)), name
    last = TINY_VISION["num_hidden_layers"] - 1
    unused = {k for k in file_keys - set(state)}
    assert unused and all(k.startswith((f"{TOWER}encoder.layers.{last}.", f"{TOWER}post_layernorm.")) for k in unused)
    assert set(state) <= file_keys
    assert f"{TOWER}encoder.layers.{last - 1}.mlp.fc1.weight" in state
    assert loaded.config.rope_parameters["rope_type"] == "longrope"
    assert loaded.config._attn_implementation == "sdpa" and loaded.config.vision_config._attn_implementation == "sdpa"
    assert loaded.dtype == torch.float32


def test_reads_the_published_config_json(tmp_path):
    shutil.copy(REPO_ROOT / "tests" / "fixtures" / "official_config.json", tmp_path / "config.json")
    config = Phi3VConfig.from_pretrained(tmp_path)
    assert config.rope_parameters["short_factor"][:2] == [1.0, 1.01]
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (3072, 32, 32064)
    assert config.rope_parameters["rope_type"] == "longrope"
    assert len(config.rope_parameters["long_factor"]) == 48
    assert config.vision_config.hidden_size == 1024 and config.vision_config.num_hidden_layers == 24
    assert config.num_vision_layers_used == 23
    assert getattr(config, "auto_map", None) is None
    assert "auto_map" not in config.to_dict()


def test_save_writes_official_names_without_shared_tensors_and_reloads(model, tiny_checkpoint, tmp_path):
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    with safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as f:
        base_keys = set(f.keys())
    # The unused tower tensors the model does not build come from the checkpoint it was loaded from.
    unused = base_keys - set(model.state_dict())
    assert keys == base_keys and unused and all(name.startswith(TOWER_PREFIX) for name in unused)
    assert "model.vision_embed_tokens.wte.weight" not in keys
    assert {"model.vision_embed_tokens.glb_GN", "model.vision_embed_tokens.sub_GN", "lm_head.weight"} <= keys
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    again = Phi3VForCausalLM.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_a_model_built_from_a_config_saves_its_own_weights_alone(tmp_path):
    model = Phi3VForCausalLM(Phi3VConfig(**official_config_dict(64, 1, 4, TINY_VISION, 0)))
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())


def test_merge_and_separator_layout_on_labelled_features():
    """Each CLIP patch vector carries (crop, row, col); the layout must place them as spec section 4 says."""
    config = Phi3VConfig(**official_config_dict(64, 1, 4, TINY_VISION, 0))
    embed = Phi3VImageEmbedding(config)
    width = config.vision_config.hidden_size
    with torch.no_grad():
        embed.glb_GN.fill_(-1.0)
        embed.sub_GN.fill_(-2.0)

    n = 3  # global view + 2 tiles of an image 1 tile high and 2 wide
    rows = torch.arange(24).view(1, 24, 1, 1).expand(n, 24, 24, width)
    cols = torch.arange(24).view(1, 1, 24, 1).expand(n, 24, 24, width)
    crop = torch.arange(n).view(n, 1, 1, 1).expand(n, 24, 24, width)
    patches = (crop * 10000 + rows * 100 + cols).float().reshape(n, 576, width)
    with torch.no_grad():
        feats = embed.layout_image(embed.merge_2x2(patches), 1, 2)
    assert feats.shape == (image_tokens(1, 2), 4 * width)
    first = feats[:, 0]  # channel 0 of the first quarter = patch (2r, 2c) of its crop
    tile_rows = first[: 12 * 25].view(12, 25)
    # Newline after every row of the 12 x 24 tile grid
    assert torch.all(tile_rows[:, 24] == -2.0)
    # Left half from tile 1 (crop 1), right half from tile 2 (crop 2), merged 2x2 blocks
    assert tile_rows[3, 5].item() == 1 * 10000 + 6 * 100 + 10
    assert tile_rows[3, 12 + 5].item() == 2 * 10000 + 6 * 100 + 10
    quarters = feats[0].view(4, width)[:, 0].tolist()
    assert quarters == [10000 + 0, 10000 + 1, 10000 + 100, 10000 + 101]
    assert feats[12 * 25, 0].item() == -1.0  # glb_GN once between tiles and global view
    global_rows = feats[12 * 25 + 1 :, 0].view(12, 13)
    assert torch.all(global_rows[:, 12] == -2.0)
    assert global_rows[11, 11].item() == 0 * 10000 + 22 * 100 + 22


def test_zero_tiles_are_skipped_with_identical_features(model):
    embed = model.model.vision_embed_tokens
    _, pixel_values, sizes = random_example([(1, 2), (1, 1)])
    calls = []
    hook = embed.img_processor.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        skipped = embed(pixel_values, sizes)
    hook.remove()
    assert calls == [3 + 2]  # real crops only, of 2 x 5 = 10 slots
    with torch.no_grad():
        all_crops = embed.img_processor(pixel_values.flatten(0, 1))[:, 1:].view(2, 5, 576, -1)
        merged = [embed.merge_2x2(all_crops[0, :3]), embed.merge_2x2(all_crops[1, :2])]
        reference = torch.cat([embed.layout_image(merged[0], 1, 2), embed.layout_image(merged[1], 1, 1)])
        reference = embed.img_projection(reference)
    torch.testing.assert_close(skipped, reference, rtol=1e-5, atol=1e-6)


def test_sdpa_equals_eager(tiny_checkpoint):
    ids, pv, sz = random_example([(1, 1)])
    logits = {}
    for impl in ("sdpa", "eager"):
        m = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation=impl).eval()
        assert m.config.vision_config._attn_implementation == impl
        with torch.no_grad():
            logits[impl] = m(input_ids=ids[None], pixel_values=pv, image_sizes=sz).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-4, atol=1e-4)


def test_flash_attention_without_package_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(ImportError, match="sdpa"):
        Phi3VForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation="flash_attention_2")


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_single_examples(model, side):
    examples = [random_example([(1, 2), (1, 1)], seed=1), random_example([], prefix=(5,) * 40, seed=2), random_example([(1, 1)], seed=3)]
    input_ids, attention_mask, pixel_values, image_sizes = pad_batch(examples, side)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch_logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            pixel_values=pixel_values, image_sizes=image_sizes,
        ).logits
        for row, (ids, pv, sz) in enumerate(examples):
            alone = model(input_ids=ids[None], pixel_values=pv if len(sz) else None, image_sizes=sz if len(sz) else None).logits[0]
            kept = batch_logits[row][attention_mask[row].bool()]
            torch.testing.assert_close(kept, alone, rtol=1e-4, atol=1e-4)


def test_right_padded_training_batch_drops_the_mask_with_identical_loss_and_gradients(tiny_checkpoint):
    """Right padding needs no mask under causal attention; left padding keeps it. Both give the same loss."""
    examples = [random_example([(1, 2)], seed=1), random_example([], prefix=(5,) * 40, seed=2), random_example([(1, 1)], seed=3)]
    m = Phi3VForCausalLM.from_pretrained(tiny_checkpoint).train()
    seen_masks = []
    m.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen_masks.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    results = {}
    for side in ("right", "left"):
        input_ids, attention_mask, pixel_values, image_sizes = pad_batch(examples, side)
        # Every token after the first of its example is a target: none is predicted from the padding.
        first_token = attention_mask.cumsum(-1) == 1
        labels = torch.where(attention_mask.bool() & ~first_token & (input_ids >= 0), input_ids, -100)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        m.zero_grad()
        loss = m(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            pixel_values=pixel_values, image_sizes=image_sizes, labels=labels,
        ).loss
        loss.backward()
        results[side] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert seen_masks[0] is None and seen_masks[1] is not None
    torch.testing.assert_close(results["right"][0], results["left"][0], rtol=1e-5, atol=1e-6)
    assert results["right"][1].keys() == results["left"][1].keys()
    for name, grad in results["right"][1].items():
        torch.testing.assert_close(grad, results["left"][1][name], rtol=1e-4, atol=1e-6)


def test_loss_on_label_positions_equals_full_cross_entropy(model):
    ids, pv, sz = random_example([(1, 1)])
    labels = ids.clone()
    labels[:-4] = -100
    with torch.no_grad():
        out = model(input_ids=ids[None], pixel_values=pv, image_sizes=sz, labels=labels[None])
        full = model(input_ids=ids[None], pixel_values=pv, image_sizes=sz).logits[0]
    reference = torch.nn.functional.cross_entropy(full[:-1].float(), labels[1:], ignore_index=-100)
    assert out.logits is None
    torch.testing.assert_close(out.loss, reference)
    with torch.no_grad():
        summed = model(input_ids=ids[None], pixel_values=pv, image_sizes=sz, labels=labels[None], num_items_in_batch=torch.tensor(6))
    torch.testing.assert_close(summed.loss, reference * 4 / 6)  # 4 labelled positions, normalised by 6


def test_gradients_with_checkpointing_equal_without(tiny_checkpoint):
    ids, pv, sz = random_example([(1, 1)])
    labels = ids.clone()
    labels[:-4] = -100
    grads = []
    for checkpointing in (False, True):
        m = Phi3VForCausalLM.from_pretrained(tiny_checkpoint).train()
        if checkpointing:
            m.activation_checkpointing_enable()
            assert m.model.vision_embed_tokens.img_processor.vision_model.encoder.layers[0].gradient_checkpointing
        m(input_ids=ids[None], pixel_values=pv, image_sizes=sz, labels=labels[None]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith(TOWER) for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_text_only_training_batch_reaches_every_vision_parameter(model):
    """A batch without images must still give the tower (zero) gradients, or DDP stalls."""
    m = Phi3VForCausalLM.from_pretrained(model.config._name_or_path).train()
    ids = torch.tensor([[1, 32010, 5, 6, 32007, 32001, 9, 32007]])
    m(input_ids=ids, labels=ids).loss.backward()
    vision = [(n, p.grad) for n, p in m.named_parameters() if "vision_embed_tokens" in n]
    assert vision and all(g is not None and torch.count_nonzero(g) == 0 for _, g in vision)


@pytest.mark.parametrize("frozen", [False, True])
def test_every_training_forward_runs_the_tower_once(model, frozen):
    """Ranks stay in step under ZeRO-3/FSDP: a text-only batch calls each tower layer as often as an image batch."""
    m = Phi3VForCausalLM.from_pretrained(model.config._name_or_path).train()
    if frozen:
        m.model.vision_embed_tokens.requires_grad_(False)
    calls = []
    for layer in m.model.vision_embed_tokens.img_processor.vision_model.encoder.layers:
        layer.register_forward_hook(lambda *_: calls.append(1))
    text_only = torch.tensor([[1, 32010, 5, 6, 32007, 32001, 9, 32007]])
    m(input_ids=text_only, labels=text_only).loss.backward()
    text_calls, calls[:] = len(calls), []
    ids, pixel_values, image_sizes = random_example([(1, 1)], seed=3)
    m(input_ids=ids[None], pixel_values=pixel_values, image_sizes=image_sizes, labels=ids.clamp(min=0)[None]).loss.backward()
    assert text_calls == len(calls) == len(m.model.vision_embed_tokens.img_processor.vision_model.encoder.layers)


def test_generate_with_cache_equals_without_and_left_padded_batch(model):
    examples = [random_example([(1, 1)], seed=4), random_example([(1, 2), (1, 1)], prefix=(9, 9, 9), seed=5)]
    input_ids, attention_mask, pixel_values, image_sizes = pad_batch(examples, side="left")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=32000)
    with torch.no_grad():
        cached = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_sizes=image_sizes, **kwargs)
        uncached = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_sizes=image_sizes, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached)
        for row, (ids, pv, sz) in enumerate(examples):
            alone = model.generate(input_ids=ids[None], pixel_values=pv, image_sizes=sz, **kwargs)
            assert torch.equal(alone[0, len(ids):], cached[row, input_ids.shape[1]:])
        sampled = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                 image_sizes=image_sizes, do_sample=True, top_k=5, max_new_tokens=4, pad_token_id=32000)
    assert sampled.shape == (2, input_ids.shape[1] + 4)


def test_repetition_penalty_reads_image_positions_as_unk(model):
    ids, pv, sz = random_example([(1, 1)], seed=7)
    penalty, steps = 1.5, 5
    with torch.no_grad():
        generated = model.generate(
            input_ids=ids[None], pixel_values=pv, image_sizes=sz, max_new_tokens=steps, do_sample=False,
            repetition_penalty=penalty, pad_token_id=32000,
        )[0, len(ids):]
        sequence = ids[None]
        for _ in range(len(generated)):
            logits = model(input_ids=sequence, pixel_values=pv, image_sizes=sz).logits[:, -1]
            seen = sequence.clamp(min=0)
            score = logits.gather(1, seen)
            logits = logits.scatter(1, seen, torch.where(score < 0, score * penalty, score / penalty))
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert len(generated) > 0
    assert torch.equal(generated, sequence[0, len(ids):])


def test_generation_across_the_longrope_switch_keeps_images(model):
    """Crossing 4096 positions resets the cache and re-runs the prompt: the images must come along."""
    long_prefix = (5,) * (4094 - image_tokens(1, 1) - 10)
    ids, pv, sz = random_example([(1, 1)], prefix=long_prefix, seed=6)
    with torch.no_grad():
        cached = model.generate(input_ids=ids[None], pixel_values=pv, image_sizes=sz, max_new_tokens=6, do_sample=False)
        uncached = model.generate(input_ids=ids[None], pixel_values=pv, image_sizes=sz, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape[1] > 4096
    assert torch.equal(cached, uncached)


def test_bf16_forward_and_backward(tiny_checkpoint):
    m = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).train()
    ids, pv, sz = random_example([(1, 1)])
    out = m(input_ids=ids[None], pixel_values=pv, image_sizes=sz, labels=ids[None])
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert m.lm_head.weight.grad.dtype == torch.bfloat16


def test_mismatched_images_and_placeholders_are_a_clear_error(model):
    ids, pv, sz = random_example([(1, 1)])
    with pytest.raises(ValueError, match="image positions"):
        model(input_ids=ids[None], pixel_values=pv, image_sizes=torch.tensor([[336, 672]]))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids[None])


def test_fresh_process_offline_load(tmp_path):
    out = tmp_path / "tiny"
    code = (
        "import sys; from common.fixtures.tiny import main; main(['--out', sys.argv[1]]);"
        "from common import Phi3VForCausalLM; from common.model.processing_phi3v import Phi3VProcessor;"
        "m = Phi3VForCausalLM.from_pretrained(sys.argv[1]); p = Phi3VProcessor.from_pretrained(sys.argv[1]);"
        "print('OK', type(m).__name__, type(p).__name__, p.tokenizer.pad_token_id)"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK Phi3VForCausalLM Phi3VProcessor 32000" in result.stdout
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    shutil.rmtree(out)


def test_auto_classes_resolve_to_the_native_model_without_remote_code(tiny_checkpoint):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert "auto_map" in json.loads((tiny_checkpoint / "config.json").read_text())
    assert type(AutoConfig.from_pretrained(tiny_checkpoint)) is Phi3VConfig
    assert type(AutoModelForCausalLM.from_pretrained(tiny_checkpoint)) is Phi3VForCausalLM
