"""Phi3VCollator and Phi3VGenerationCollator: exact token layout, labels, packing and left padding, on CPU."""

import random

import pytest
import torch
from PIL import Image

from common.data.collator import Phi3VCollator, Phi3VGenerationCollator, example_length, example_tokens, hd_output_size
from common.data.conversation import IGNORE_INDEX, encode_conversation, encode_prompt
from common.errors import ExampleError
from common.model.image_processing_phi3v import Phi3VImageProcessor, hd_transform
from common.model.modeling_phi3v import Phi3VForCausalLM
from common.model.processing_phi3v import Phi3VProcessor

NUM_CROPS = 4
RED = Image.new("RGB", (500, 300), (255, 0, 0))
GREEN_TALL = Image.new("RGB", (200, 400), (0, 255, 0))
BLUE_SQUARE = Image.new("RGB", (300, 300), (0, 0, 255))
# Image token counts by the spec's formula (h * w + 1) * 144 + 1 + (h + 1) * 12, at 4 crops:
# 500x300: ratio 5/3, scale 2 (2 * ceil(1.2) = 4 <= 4; 3 * ceil(1.8) = 6 > 4), 672 x int(403.2) -> padded
#   672x672: h = w = 2 -> 5 * 144 + 1 + 3 * 12 = 757.
# 200x400 (tall, transposed to 400x200): ratio 2, scale 2, 672 x 336 -> transposed back H 672, W 336:
#   h = 2, w = 1 -> 3 * 144 + 1 + 3 * 12 = 469.
# 300x300: ratio 1, scale 2 (2 * 2 = 4; 3 * 3 = 9 > 4) -> 672x672 -> 757.
RED_TOKENS, GREEN_TOKENS, BLUE_TOKENS = 757, 469, 757

SINGLE = {
    "id": "single",
    "images": [RED],
    "messages": [{"role": "user", "content": "<|image_1|>\nWhat colour?"}, {"role": "assistant", "content": "red"}],
}
MULTI = {
    "id": "multi",
    "images": [GREEN_TALL, BLUE_SQUARE],
    "messages": [
        {"role": "user", "content": "<|image_1|><|image_2|>\nSame?"},
        {"role": "assistant", "content": "no"},
        {"role": "user", "content": "Colours?"},
        {"role": "assistant", "content": "green and blue"},
    ],
}
TEXT_ONLY = {
    "id": "text",
    "images": [],
    "messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}],
}


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=NUM_CROPS)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def piece(processor, text):
    """A text piece between image tags, tokenized on its own with the default special tokens (spec 5)."""
    return processor.tokenizer(text)["input_ids"]


def answer(processor, text):
    return processor.tokenizer(text + "<|end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"]


def expected_rows(processor):
    """(input_ids, labels) of SINGLE and MULTI, built from tokenizer calls and the token counts above."""
    single_prompt = piece(processor, "<|user|>\n") + [-1] * RED_TOKENS + piece(processor, "\nWhat colour?<|end|>\n<|assistant|>\n")
    single_answer = answer(processor, "red")
    multi_prompt_1 = (
        piece(processor, "<|user|>\n")
        + [-1] * GREEN_TOKENS
        + piece(processor, "")
        + [-2] * BLUE_TOKENS
        + piece(processor, "\nSame?<|end|>\n<|assistant|>\n")
    )
    multi_answer_1 = answer(processor, "no")
    multi_prompt_2 = piece(processor, "<|user|>\nColours?<|end|>\n<|assistant|>\n")
    multi_answer_2 = answer(processor, "green and blue")
    single = (single_prompt + single_answer, [IGNORE_INDEX] * len(single_prompt) + single_answer)
    multi = (
        multi_prompt_1 + multi_answer_1 + multi_prompt_2 + multi_answer_2,
        [IGNORE_INDEX] * len(multi_prompt_1) + multi_answer_1 + [IGNORE_INDEX] * len(multi_prompt_2) + multi_answer_2,
    )
    return single, multi


def test_padded_batch_is_exact(processor):
    (single_ids, single_labels), (multi_ids, multi_labels) = expected_rows(processor)
    pad = processor.tokenizer.pad_token_id
    assert pad == 32000
    width = len(multi_ids)
    fill = width - len(single_ids)
    assert fill > 0

    batch = Phi3VCollator(processor)([SINGLE, MULTI])

    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_sizes"}
    assert torch.equal(batch["input_ids"], torch.tensor([single_ids + [pad] * fill, multi_ids]))
    assert torch.equal(batch["labels"], torch.tensor([single_labels + [IGNORE_INDEX] * fill, multi_labels]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1] * len(single_ids) + [0] * fill, [1] * width]))
    for key in ("input_ids", "attention_mask", "labels", "image_sizes"):
        assert batch[key].dtype == torch.int64, key
    # The answers really are labelled: every label equals the input id at its position or is -100.
    labelled = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][labelled], batch["input_ids"][labelled])


def test_pixel_values_follow_batch_and_image_order(processor):
    batch = Phi3VCollator(processor)([SINGLE, MULTI])
    one_by_one = [processor.image_processor([im], num_crops=NUM_CROPS)["pixel_values"] for im in (RED, GREEN_TALL, BLUE_SQUARE)]
    expected = torch.cat(one_by_one)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].shape == (3, NUM_CROPS + 1, 3, 336, 336)
    assert torch.equal(batch["pixel_values"], expected)
    assert batch["image_sizes"].tolist() == [[672, 672], [672, 336], [672, 672]]


def test_text_only_examples(processor):
    collator = Phi3VCollator(processor)
    mixed = collator([TEXT_ONLY, SINGLE])
    assert mixed["pixel_values"].shape[0] == 1 and mixed["image_sizes"].tolist() == [[672, 672]]
    text_ids = encode_conversation(processor, TEXT_ONLY).input_ids
    assert mixed["input_ids"][0, : len(text_ids)].tolist() == text_ids
    assert (mixed["input_ids"][0] >= 0).all()

    text_only = collator([TEXT_ONLY, TEXT_ONLY])
    assert set(text_only) == {"input_ids", "attention_mask", "labels"}


def test_padding_free_row_is_the_concatenation(processor):
    (single_ids, single_labels), (multi_ids, multi_labels) = expected_rows(processor)
    padded = Phi3VCollator(processor)([SINGLE, MULTI])
    packed = Phi3VCollator(processor, padding_free=True)([SINGLE, MULTI])

    assert set(packed) == {"input_ids", "labels", "position_ids", "pixel_values", "image_sizes"}
    assert torch.equal(packed["input_ids"], torch.tensor([single_ids + multi_ids]))
    starts = [0, len(single_ids)]
    expected_labels = single_labels + multi_labels
    for start in starts:
        expected_labels[start] = IGNORE_INDEX
    assert torch.equal(packed["labels"], torch.tensor([expected_labels]))
    assert packed["labels"][0, starts].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert torch.equal(packed["position_ids"], torch.tensor([list(range(len(single_ids))) + list(range(len(multi_ids)))]))
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])
    assert torch.equal(packed["image_sizes"], padded["image_sizes"])


def test_padding_free_loss_equals_padded_loss(processor, model):
    padded = Phi3VCollator(processor)([SINGLE, MULTI, TEXT_ONLY])
    packed = Phi3VCollator(processor, padding_free=True)([SINGLE, MULTI, TEXT_ONLY])
    with torch.no_grad():
        padded_loss = model(**padded, use_cache=False).loss
        packed_loss = model(**packed, use_cache=False).loss
        # Without restarting positions the examples attend to each other: the comparison can see a leak.
        leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
        leaky_loss = model(**leaky, use_cache=False).loss
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=0)
    assert not torch.isclose(leaky_loss, padded_loss, rtol=1e-5, atol=0)


def test_max_length_names_the_example(processor):
    length = len(encode_conversation(processor, MULTI))
    Phi3VCollator(processor, max_length=length)([SINGLE, MULTI])
    message = rf"'multi' \(batch position 1\) is {length} tokens long, more than max_length={length - 1}"
    with pytest.raises(ExampleError, match=message):
        Phi3VCollator(processor, max_length=length - 1)([SINGLE, MULTI])
    with pytest.raises(ExampleError, match=r"batch position 0 \(it has no 'id'\) is \d+ tokens long"):
        Phi3VCollator(processor, max_length=10, padding_free=True)([{k: v for k, v in SINGLE.items() if k != "id"}])
    # 0 is --max_length 0: no limit.
    assert Phi3VCollator(processor, max_length=0)([MULTI])["input_ids"].shape == (1, length)
    with pytest.raises(ValueError, match=r"max_length must be a non-negative int \(0 or None: no limit\)"):
        Phi3VCollator(processor, max_length=-1)


def test_bad_example_is_named(processor):
    bad = dict(SINGLE, id="bad-tags", images=[RED, RED])
    with pytest.raises(ExampleError, match=r"example 'bad-tags' \(batch position 1\) cannot be encoded: .*image tags \[1\].*2 image"):
        Phi3VCollator(processor)([TEXT_ONLY, bad])


def test_length_of_is_exact_without_pixels(processor):
    collator = Phi3VCollator(processor)
    for example in (SINGLE, MULTI, TEXT_ONLY):
        assert collator.length_of(example) == len(encode_conversation(processor, example))
    assert collator.length_of(SINGLE) == len(expected_rows(processor)[0][0])
    for num_crops in (1, 16):
        at_crops = Phi3VProcessor(Phi3VImageProcessor(num_crops=num_crops), processor.tokenizer)
        assert example_length(at_crops, MULTI) == len(encode_conversation(at_crops, MULTI))


def test_token_counts_match_the_labels(processor):
    for example in (SINGLE, MULTI, TEXT_ONLY):
        encoded = encode_conversation(processor, example)
        supervised = sum(label != IGNORE_INDEX for label in encoded.labels)
        assert example_tokens(processor, example) == (len(encoded), supervised)


def test_hd_output_size_matches_hd_transform():
    rng = random.Random(0)
    sizes = [(1000, 300), (300, 1000), (1, 1), (20, 10), (4000, 10), (10, 4000), (337, 336), (672, 335)]
    sizes += [(rng.randint(1, 900), rng.randint(1, 900)) for _ in range(40)]
    for width, height in sizes:
        for num_crops in (1, 2, 4, 9, 16):
            out = hd_transform(Image.new("RGB", (width, height)), num_crops)
            assert hd_output_size((width, height), num_crops) == (out.height, out.width), (width, height, num_crops)


def test_generation_collator_left_pads(processor):
    single_eval = {"id": "single", "images": [RED], "messages": SINGLE["messages"][:1], "references": ["red", "Red"]}
    text_eval = {"id": "text", "images": [], "messages": TEXT_ONLY["messages"][:1], "references": ["yes"]}
    inputs, metadata = Phi3VGenerationCollator(processor)([text_eval, single_eval])

    assert metadata == {"ids": ["text", "single"], "references": [["yes"], ["red", "Red"]]}
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    text_ids = encode_prompt(processor, text_eval).input_ids
    single_ids = encode_prompt(processor, single_eval).input_ids
    fill = len(single_ids) - len(text_ids)
    pad = processor.tokenizer.pad_token_id
    assert torch.equal(inputs["input_ids"], torch.tensor([[pad] * fill + text_ids, single_ids]))
    assert torch.equal(inputs["attention_mask"], torch.tensor([[0] * fill + [1] * len(text_ids), [1] * len(single_ids)]))
    assert torch.equal(inputs["pixel_values"], processor.image_processor([RED], num_crops=NUM_CROPS)["pixel_values"])
    assert inputs["image_sizes"].tolist() == [[672, 672]]
    prompt_end = processor.tokenizer.convert_tokens_to_ids(["<|assistant|>", "▁", "<0x0A>"])
    assert inputs["input_ids"][:, -3:].tolist() == [prompt_end, prompt_end]

    with pytest.raises(ExampleError, match=r"evaluation example 'x' \(batch position 0\).*'references'"):
        Phi3VGenerationCollator(processor)([dict(text_eval, id="x", references="yes")])
