"""The validation pass before training: damaged images, lengths, nothing to learn, and its summary line."""

import io
import json
import logging

import datasets
import numpy as np
import pytest
from PIL import Image

from common.data.dataset import RecipeDataset, image_check_pool, load_jsonl_conversations
from common.data.validation import SkipLog, validate_training_data
from common.errors import DataError, ExampleError
from common.model.processing_phi3v import Phi3VProcessor
from common.training.arguments import parse_args

NUM_CROPS = 1


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=NUM_CROPS)


def photo_bytes(file_format: str, seed: int = 0) -> bytes:
    """A noisy photo: most of its file is compressed pixel data, so cutting the file cuts the pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=file_format)
    return buffer.getvalue()


def cut_in_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def conversation(example_id: str, images: list[str], answer: str = "Red") -> dict:
    turn = {"images": images, "user": "What colour is it?", "assistant": answer}
    return {"id": example_id, "conversations": [turn]}


@pytest.fixture
def jsonl_data(tmp_path):
    """Three one-image rows (JPEG, PNG, JPEG); the third JPEG is cut in half, its header intact."""
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(photo_bytes("JPEG", 1))
    (root / "b.png").write_bytes(photo_bytes("PNG", 2))
    (root / "cut.jpg").write_bytes(cut_in_half(photo_bytes("JPEG", 3)))
    lines = [conversation("a", ["a.jpg"]), conversation("b", ["b.png"]), conversation("cut", ["cut.jpg"])]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, root


def test_truncated_jpeg_stops_the_run_at_validation_naming_row_and_file(jsonl_data, processor):
    path, root = jsonl_data
    dataset = RecipeDataset(load_jsonl_conversations(path, root), name="custom train")
    # The header is intact: reading image sizes alone, as before, finds nothing wrong.
    assert len(dataset.lengths(processor)) == 3
    message = rf"custom train row 2 \(id 'cut'\): OSError: image file {root.resolve()}/cut\.jpg does not decode: image file is truncated"
    with pytest.raises(ExampleError, match=message) as error:
        validate_training_data(dataset, processor, None, None)
    assert "\n" not in str(error.value)


def test_truncated_jpeg_is_skipped_with_skip_bad_examples(jsonl_data, processor, tmp_path):
    path, root = jsonl_data
    skip_log = SkipLog(tmp_path / "out")
    dataset = validate_training_data(RecipeDataset(load_jsonl_conversations(path, root), name="custom train"), processor, None, skip_log)
    assert [dataset[i]["id"] for i in range(len(dataset))] == ["a", "b"]
    skipped = [json.loads(line) for line in skip_log.path.read_text().splitlines()]
    assert len(skipped) == 1 and skipped[0]["stage"] == "validation"
    assert "row 2 (id 'cut')" in skipped[0]["reason"] and "cut.jpg does not decode" in skipped[0]["reason"]


def test_damaged_images_in_a_hub_dataset_are_caught(processor):
    png = photo_bytes("PNG", 4)
    damaged_png = png[:100] + bytes([png[100] ^ 0xFF]) + png[101:]
    images = [photo_bytes("JPEG", 5), cut_in_half(photo_bytes("JPEG", 6)), cut_in_half(png), damaged_png, png]
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
    source = datasets.Dataset.from_dict(
        {"id": [f"r{i}" for i in range(len(images))], "image": [{"bytes": b, "path": None} for b in images]},
        features=features,
    )

    def to_example(row, index):
        return {"images": [row["image"]], "messages": [{"role": "user", "content": "<|image_1|>\nq"},
                                                       {"role": "assistant", "content": "a"}]}

    with image_check_pool(2) as pool:
        found = {scanned.index: scanned.error for scanned in RecipeDataset(source, to_example, name="hub").scan(
            processor, pool)}
    assert [index for index, error in found.items() if error is not None] == [1, 2, 3]
    assert "hub row 1 (id 'r1'): OSError: images[0] does not decode: image file is truncated" in str(found[1])


def test_unconvertible_image_mode_is_caught_without_decoding(processor):
    class ImageOfUnknownMode(Image.Image):
        mode = "XYZ;12"

    rows = [{"id": "odd", "images": [ImageOfUnknownMode()], "messages": [{"role": "user", "content": "<|image_1|>\nq"},
                                                                         {"role": "assistant", "content": "a"}]}]
    with pytest.raises(ExampleError, match=r"row 0 \(id 'odd'\): ValueError: cannot convert an image of PIL mode 'XYZ;12'"):
        validate_training_data(RecipeDataset(rows, name="odd"), processor, None, None)


def text_row(example_id: str, answer: str = "yes", images: list | None = None) -> dict:
    tags = "".join(f"<|image_{k}|>" for k in range(1, len(images or []) + 1))
    return {"id": example_id, "images": images or [],
            "messages": [{"role": "user", "content": f"{tags}\nSay yes."}, {"role": "assistant", "content": answer}]}


def test_a_121k_token_row_is_refused_by_default(tiny_checkpoint, tmp_path):
    args, = parse_args(argv=["--output_dir", str(tmp_path), "--deepspeed", "none"])
    processor = Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=16)
    # 48 pages at 16 crops, 2,509 image tokens each: the long row of the probe (issue 12).
    page = Image.new("RGB", (1344, 1344))
    rows = [text_row("short"), text_row("pages", images=[page] * 48)]
    message = rf"docs row 1 \(id 'pages'\) is 12\d{{4}} tokens long, more than --max_length {args.max_length}\..*0 turns the limit off"
    with pytest.raises(ExampleError, match=message):
        validate_training_data(RecipeDataset(rows, name="docs"), processor, args.max_length, None)
    kept = validate_training_data(RecipeDataset(rows, name="docs"), processor, 0, None)
    assert len(kept) == 2


def test_examples_without_a_supervised_token_are_an_error(processor, tmp_path, monkeypatch):
    # A template mistake that labels no answer token: the loss would be 0 on every step.
    monkeypatch.setattr("common.data.collator.answer_ids", lambda processor, content: [])
    rows = [text_row("a"), text_row("b")]
    with pytest.raises(DataError, match=r"toy row 0 \(id 'a'\) has no supervised token: every label is masked, so there is nothing to learn"):
        validate_training_data(RecipeDataset(rows, name="toy"), processor, None, None)
    with pytest.raises(DataError, match=r"toy: all 2 rows are unusable; the first: toy row 0 \(id 'a'\) has no supervised token") as error:
        validate_training_data(RecipeDataset(rows, name="toy"), processor, None, SkipLog(tmp_path))
    assert "\n" not in str(error.value)


def test_empty_data_is_an_error(processor):
    with pytest.raises(DataError, match="toy holds no rows, so there is nothing to train on"):
        validate_training_data(RecipeDataset([], name="toy"), processor, None, None)


def test_summary_gives_the_length_distribution_and_the_longest_id(processor, caplog):
    rows = [text_row(f"r{i}", "yes " * i) for i in range(1, 101)]
    lengths = sorted(RecipeDataset(rows, name="toy").lengths(processor))
    with caplog.at_level(logging.INFO, logger="common.data.validation"):
        validate_training_data(RecipeDataset(rows, name="toy"), processor, 8192, None)
    expected = (f"toy: tokens per example: min {lengths[0]}, median {lengths[49]}, p99 {lengths[98]}, max {lengths[99]} "
                "(id 'r100'); --max_length 8192")
    assert expected in caplog.messages
