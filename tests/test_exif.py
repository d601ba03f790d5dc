"""EXIF orientation: one rule in every path (JSONL training and evaluation rows, hub rows, predict inputs): the
photo as an image viewer shows it, applied once."""

import json

import datasets
import numpy as np
import pytest
from PIL import Image, ImageOps

from common.data.collator import example_tokens
from common.data.dataset import RecipeDataset, jsonl_eval_examples, load_image, load_jsonl_conversations
from common.model.processing_phi3v import Phi3VProcessor
from common.outputs.predict import open_images

ORIENTATION = 0x0112


def stored_photo(path, orientation: int) -> np.ndarray:
    """A 40x24 JPEG whose EXIF tag says how to turn it; returns the pixels a viewer shows (decoded, then turned)."""
    rng = np.random.default_rng(orientation)
    pixels = np.repeat(np.repeat(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8), 4, axis=0), 4, axis=1)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif)
    with Image.open(path) as stored:
        return np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Photos with orientations 1 (upright), 3 (turned 180 degrees), 6 and 8 (turned 90 degrees), one JSONL row each."""
    root = tmp_path_factory.mktemp("exif")
    (root / "images").mkdir()
    shown = {}
    with open(root / "rows.jsonl", "w") as rows:
        for orientation in (1, 3, 6, 8):
            name = f"photo{orientation}.jpg"
            shown[name] = stored_photo(root / "images" / name, orientation)
            rows.write(json.dumps({"id": name, "source": "exif", "conversations": [
                {"images": [name], "user": "What is it?", "assistant": "A photo."}]}) + "\n")
    return root, shown


def test_a_turned_photo_is_loaded_as_a_viewer_shows_it(photos):
    root, shown = photos
    for name, pixels in shown.items():
        loaded = load_image(root / "images" / name)
        np.testing.assert_array_equal(np.asarray(loaded), pixels, err_msg=name)
    assert shown["photo6.jpg"].shape[:2] == shown["photo8.jpg"].shape[:2] == (40, 24)


def test_every_path_turns_the_photo_once_and_counts_its_tokens_upright(tiny_checkpoint, photos):
    root, shown = photos
    processor = Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=4)
    training = RecipeDataset(load_jsonl_conversations(root / "rows.jsonl", root / "images"), name="jsonl train")
    evaluation = RecipeDataset(jsonl_eval_examples(root / "rows.jsonl", root / "images"), name="jsonl val", for_training=False)
    # A hub dataset of the same files: `datasets` turns them upright when it decodes them, and nothing turns them again.
    hub = datasets.Dataset.from_dict(
        {"image": [str(root / "images" / name) for name in shown]}, features=datasets.Features({"image": datasets.Image()})
    )
    hub_rows = RecipeDataset(hub, lambda row, index: {"images": [row["image"]], "messages": [
        {"role": "user", "content": "<|image_1|>\nWhat is it?"}, {"role": "assistant", "content": "A photo."}]}, name="hub")
    scanned = {row.example_id: row.tokens for row in training.scan(processor)}
    for index, (name, pixels) in enumerate(shown.items()):
        upright = Image.fromarray(pixels)
        for path, image in [
            ("training", training[index]["images"][0]),
            ("evaluation", evaluation[index]["images"][0]),
            ("hub", hub_rows[index]["images"][0]),
            ("predict", open_images({"id": name, "images": [str(root / "images" / name)]})["images"][0]),
        ]:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), pixels, err_msg=f"{path} {name}")
        # The validation pass and length grouping count the tokens of the upright photo, read from its header.
        example = {"images": [upright], "messages": training[index]["messages"]}
        assert scanned[name] == example_tokens(processor, example), name
    assert hub_rows.lengths(processor) == training.lengths(processor)
