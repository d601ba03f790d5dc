"""Phi3VProcessor token layout (spec section 5) and the tiny tokenizer, on CPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from common.fixtures.tiny_tokenizer import build_tiny_tokenizer
from common.model.image_processing_phi3v import Phi3VImageProcessor
from common.model.processing_phi3v import Phi3VProcessor, load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
SPECIAL_IDS = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "<|endoftext|>": 32000,
    "<|assistant|>": 32001,
    "<|placeholder1|>": 32002,
    "<|placeholder4|>": 32005,
    "<|system|>": 32006,
    "<|end|>": 32007,
    "<|placeholder5|>": 32008,
    "<|placeholder6|>": 32009,
    "<|user|>": 32010,
}
# 20x10 at 4 crops -> 336x672 (1x2 tiles); 10x20 -> 672x336 (2x1 tiles).
WIDE, TALL = Image.new("RGB", (20, 10), (255, 0, 0)), Image.new("RGB", (10, 20), (0, 0, 255))
WIDE_TOKENS, TALL_TOKENS = 3 * 144 + 1 + 2 * 12, 3 * 144 + 1 + 3 * 12
TEXTS_FOR_ROUND_TRIP = [
    "Hello world",
    "Classify the video into one of the following classes: ApplyEyeMakeup, ApplyLipstick, Archery, "
    "BabyCrawling, BalanceBeam, BandMarching, BaseballPitch, Basketball, BasketballDunk, BenchPress.",
    "What is the total? Answer briefly.\nIt is 1,234.56 dollars (yes/no/true/false).",
    "Is it hateful or not hateful? Unseen wörds, émojis 🙂 and 中文 fall back to bytes.",
]
CHAT_TEXT = "<|user|>\nhi<|end|>\n<|assistant|>\nYes.<|end|>\n<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return Phi3VProcessor(Phi3VImageProcessor(num_crops=4), tokenizer)


def test_special_token_ids(tokenizer):
    for token, token_id in SPECIAL_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<unk>",
    )
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 32000, 32000)
    assert tokenizer.vocab_size == 32000
    assert len(tokenizer) <= 32064
    assert tokenizer.padding_side == "right"
    assert tokenizer("Hello").input_ids[0] == 1
    assert tokenizer("Hello").input_ids[-1] != 32000
    # Special tokens are never split and stay single ids inside text.
    assert tokenizer("<|user|>\nhi<|end|>", add_special_tokens=False).input_ids[0] == 32010
    assert 32007 in tokenizer("<|user|>\nhi<|end|>").input_ids


def test_decode_round_trip(tokenizer):
    for text in TEXTS_FOR_ROUND_TRIP:
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids[1:]) == text
    # As in the official tokenizer, text after a special token starts with a "▁", which decodes as a space.
    assert tokenizer.decode(tokenizer(CHAT_TEXT).input_ids[1:]) == CHAT_TEXT.replace("|>\n", "|> \n")
    plain = TEXTS_FOR_ROUND_TRIP[2]
    assert tokenizer.decode(tokenizer(plain).input_ids, skip_special_tokens=True) == plain
    # Newlines go through byte fallback, as in Llama's vocabulary.
    assert tokenizer.convert_tokens_to_ids("<0x0A>") in tokenizer("a\nb").input_ids


def test_build_is_deterministic_and_fast(tmp_path):
    import time

    start = time.perf_counter()
    build_tiny_tokenizer().save_pretrained(tmp_path / "a")
    assert time.perf_counter() - start < 3
    build_tiny_tokenizer().save_pretrained(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_chat_template(tokenizer, processor):
    conversation = [
        {"role": "user", "content": "<|image_1|>\nWhat is shown?"},
        {"role": "assistant", "content": "A cat."},
    ]
    expected = "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\nA cat.<|end|>\n"
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == expected
    assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == expected
    assert (
        processor.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
        == "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n"
    )
    system = [{"role": "system", "content": "Be brief."}, conversation[0]]
    assert tokenizer.apply_chat_template(system, tokenize=False).startswith("<|system|>\nBe brief.<|end|>\n<|user|>\n")


def test_tokenizer_save_load_round_trip_offline(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    template = (tmp_path / "chat_template.jinja").read_text() if (tmp_path / "chat_template.jinja").exists() else None
    assert (template or config.get("chat_template")) == tokenizer.chat_template
    # A fresh process with the hub switched off proves nothing is fetched.
    script = (
        "import json, sys; from common.model.processing_phi3v import load_tokenizer;"
        "t = load_tokenizer(sys.argv[1]); texts = json.loads(sys.argv[2]);"
        "print(json.dumps({'class': type(t).__name__, 'ids': [t(x).input_ids for x in texts], 'len': len(t),"
        " 'special': [t.bos_token_id, t.eos_token_id, t.pad_token_id, t.unk_token_id], 'side': t.padding_side,"
        " 'template': t.chat_template, 'decoded': [t.decode(t(x).input_ids[1:]) for x in texts]}))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), json.dumps(TEXTS_FOR_ROUND_TRIP)],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["class"] in ("LlamaTokenizer", "LlamaTokenizerFast")
    assert loaded["ids"] == [tokenizer(x).input_ids for x in TEXTS_FOR_ROUND_TRIP]
    assert loaded["decoded"] == TEXTS_FOR_ROUND_TRIP
    assert loaded["len"] == len(tokenizer)
    assert loaded["special"] == [1, 32000, 32000, 0]
    assert loaded["side"] == "right"
    assert loaded["template"] == tokenizer.chat_template

    reloaded = load_tokenizer(tmp_path)
    for token, token_id in SPECIAL_IDS.items():
        assert reloaded.convert_tokens_to_ids(token) == token_id, token


@pytest.mark.parametrize("rstrip", [False, True])
def test_loaded_tokenizer_tokenizes_as_its_file_says(tokenizer, tmp_path, rstrip):
    """The official pipeline puts "▁" after every special token that text follows: <|user|>\n is 32010, "▁", 13.

    Some Phi-3 tokenizer files mark the chat tokens rstrip (they swallow the whitespace after them); the
    loaded tokenizer must follow the file either way.
    """
    tokenizer.save_pretrained(tmp_path)
    tokenizer_json = json.loads((tmp_path / "tokenizer.json").read_text())
    for added in tokenizer_json["added_tokens"]:
        if added["content"] in ("<|user|>", "<|assistant|>", "<|end|>"):
            added["rstrip"] = rstrip
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    as_written = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    texts = [*TEXTS_FOR_ROUND_TRIP, CHAT_TEXT, " leading space", "two  spaces", "<|end|> x", "\n\nnewlines first"]
    for text in texts:
        assert loaded(text).input_ids == as_written.encode(text).ids, text
        assert loaded.decode(loaded(text).input_ids) == as_written.decode(as_written.encode(text).ids, skip_special_tokens=False), text
    space = loaded.convert_tokens_to_ids("▁")
    if rstrip:
        assert loaded("<|end|>\n<|assistant|>\n", add_special_tokens=False).input_ids == [32007, 32001]
    else:
        assert all(loaded(text).input_ids == tokenizer(text).input_ids for text in texts)
        assert loaded("<|user|>\n").input_ids == [1, 32010, space, 13]
        assert loaded("<|end|>\n<|assistant|>\n", add_special_tokens=False).input_ids == [32007, space, 13, 32001, space, 13]


def test_two_image_layout_is_exact(processor, tokenizer):
    pieces = ["<|user|>\n", "\n", "\nCompare the two images.<|end|>\n<|assistant|>\n"]
    text = pieces[0] + "<|image_1|>" + pieces[1] + "<|image_2|>" + pieces[2]
    out = processor(text, images=[WIDE, TALL])

    piece_ids = [tokenizer(p).input_ids for p in pieces]
    assert all(ids[0] == tokenizer.bos_token_id for ids in piece_ids)
    expected = piece_ids[0] + [-1] * WIDE_TOKENS + piece_ids[1] + [-2] * TALL_TOKENS + piece_ids[2]
    assert out["input_ids"].dtype == torch.long
    assert out["input_ids"].tolist() == [expected]
    assert out["attention_mask"].tolist() == [[1] * len(expected)]
    assert out["image_sizes"].tolist() == [[336, 672], [672, 336]]
    assert out["pixel_values"].shape == (2, 5, 3, 336, 336)
    assert torch.equal(out["pixel_values"], processor.image_processor([WIDE, TALL])["pixel_values"])
    assert processor.encode_with_images(text, [WIDE_TOKENS, TALL_TOKENS]) == expected


def test_tags_at_the_edges_keep_empty_pieces(processor, tokenizer):
    # The reference tokenizes every piece, empty ones too, so `<s>` surrounds a lone tag.
    assert processor.encode_with_images("<|image_1|>", [5]) == [1, -1, -1, -1, -1, -1, 1]
    assert processor.encode_with_images("no images here", []) == tokenizer("no images here").input_ids


def test_per_call_num_crops(processor):
    out = processor("<|image_1|>x", images=[Image.new("RGB", (1344, 1344))], num_crops=16)
    assert out["pixel_values"].shape[1] == 17
    assert (out["input_ids"] == -1).sum().item() == 2509


@pytest.mark.parametrize(
    "text, images, message",
    [
        ("<|image_1|> one tag", [WIDE, TALL], r"text\[0\].*1 image tag\(s\) but 2 image"),
        ("no tag", [WIDE], r"text\[0\].*0 image tag\(s\) but 1 image"),
        ("<|image_2|> gap", [WIDE], r"text\[0\].*without gaps"),
        ("<|image_1|><|image_1|> repeat", [WIDE, TALL], r"text\[0\].*repeats"),
        ("<|image_2|><|image_1|> order", [WIDE, TALL], r"text\[0\].*in order"),
        (["fine", "<|image_1|><|image_3|>"], [None, [WIDE, TALL]], r"text\[1\].*without gaps"),
        (["<|image_1|>", "<|image_1|>"], [[WIDE], []], r"text\[1\].*1 image tag\(s\) but 0 image"),
    ],
)
def test_tag_errors_name_the_example(processor, text, images, message):
    with pytest.raises(ValueError, match=message):
        processor(text, images=images)


def test_encode_with_images_checks_counts(processor):
    with pytest.raises(ValueError, match="1 image tag"):
        processor.encode_with_images("<|image_1|>", [])


def test_batch_shape_errors(processor):
    with pytest.raises(ValueError, match="one entry per text"):
        processor(["<|image_1|>a", "<|image_1|>b"], images=[WIDE])
    with pytest.raises(TypeError, match=r"images\[0\]"):
        processor(["<|image_1|>a"], images=[["not an image"]])
    with pytest.raises(TypeError, match="text must be"):
        processor(42)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_with_different_image_counts_is_padded(processor, side):
    texts = [
        "<|user|>\n<|image_1|>\n<|image_2|>\nSame or different?<|end|>\n<|assistant|>\n",
        "<|user|>\nNo image in this one, just words.<|end|>\n<|assistant|>\n",
        "<|image_1|>\nAnswer briefly.",
    ]
    images = [[WIDE, TALL], None, [TALL]]
    out = processor(texts, images=images, padding_side=side)
    singles = [processor(t, images=ims)["input_ids"][0].tolist() for t, ims in zip(texts, images)]
    longest = max(len(s) for s in singles)
    assert out["input_ids"].shape == (3, longest)
    for row, mask, single in zip(out["input_ids"].tolist(), out["attention_mask"].tolist(), singles):
        fill = longest - len(single)
        if side == "right":
            assert row == single + [32000] * fill
            assert mask == [1] * len(single) + [0] * fill
        else:
            assert row == [32000] * fill + single
            assert mask == [0] * fill + [1] * len(single)
    assert out["image_sizes"].tolist() == [[336, 672], [672, 336], [672, 336]]
    assert torch.equal(out["pixel_values"], processor.image_processor([WIDE, TALL, TALL])["pixel_values"])
    # Each text's placeholder runs count from -1 again.
    assert (out["input_ids"][2] == -1).sum().item() == TALL_TOKENS
    assert not (out["input_ids"][2] == -2).any()


def test_default_padding_side_is_the_tokenizer_s(processor):
    out = processor(["a", "a much longer text than the first"])
    assert out["input_ids"][0, -1].item() == 32000 and out["attention_mask"][0, 0].item() == 1


def test_no_images_at_all_has_no_pixel_values(processor):
    out = processor(["just text", "more text here"])
    assert "pixel_values" not in out and "image_sizes" not in out
    with pytest.raises(ValueError, match="padding=True"):
        processor(["just text", "more text here"], padding=False)
    unpadded = processor(["a", "a much longer text"], padding=False, return_tensors=None)["input_ids"]
    assert unpadded[0] == processor.tokenizer("a").input_ids


def test_decode_and_batch_decode_delegate(processor, tokenizer):
    ids = tokenizer(["Answer briefly.", "not hateful"]).input_ids
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["Answer briefly.", "not hateful"]
    assert processor.decode(ids[1], skip_special_tokens=True) == "not hateful"


def test_processor_save_and_load(processor, tmp_path):
    # Beside an official-style config.json (model_type phi3_v, auto_map to remote code), as in a checkpoint.
    shutil.copy(REPO_ROOT / "tests" / "fixtures" / "official_config.json", tmp_path / "config.json")
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["num_crops"] == 4 and "auto_map" not in saved
    loaded = Phi3VProcessor.from_pretrained(tmp_path, num_crops=16)
    assert loaded.image_processor.num_crops == 16
    assert Phi3VProcessor.from_pretrained(tmp_path).image_processor.num_crops == 4
    text = "<|image_1|>\nWhat is this?"
    expected = processor(text, images=[WIDE])["input_ids"]
    assert torch.equal(loaded(text, images=[WIDE], num_crops=4)["input_ids"], expected)
    with pytest.raises(ValueError, match="remote code"):
        Phi3VProcessor.from_pretrained(tmp_path, trust_remote_code=True)


def test_trainer_saves_the_processor_with_checkpoints(processor, tmp_path):
    from transformers import Trainer, TrainingArguments

    class Quadratic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 1)

        def forward(self, x=None, labels=None):
            return {"loss": self.linear(x).pow(2).mean()}

    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, max_steps=1, save_steps=1, report_to="none",
        per_device_train_batch_size=2,
    )
    dataset = [{"x": torch.ones(2)}] * 2
    trainer = Trainer(model=Quadratic(), args=args, train_dataset=dataset, processing_class=processor)
    trainer.train()
    loaded = Phi3VProcessor.from_pretrained(tmp_path / "checkpoint-1")
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    text = "<|image_1|>hi"
    assert torch.equal(loaded(text, images=[WIDE])["input_ids"], processor(text, images=[WIDE])["input_ids"])
