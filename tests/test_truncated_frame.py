"""A damaged file in a row of several images (a video's 8 frames) is named in the row's error."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from common.data.dataset import RecipeDataset, image_check_pool, jsonl_eval_examples
from common.data.validation import validate_evaluation_data
from common.errors import ExampleError
from common.model.processing_phi3v import Phi3VProcessor

FRAMES = 8


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def video_row(tmp_path):
    """One validation row as convert_ucf101.py writes it: 8 frames of one video."""
    folder = tmp_path / "images" / "val" / "Archery"
    folder.mkdir(parents=True)
    frames = [f"val/Archery/v_Archery_g01_c01.{i}.jpg" for i in range(FRAMES)]
    for i, name in enumerate(frames):
        (tmp_path / "images" / name).write_bytes(jpeg(i))
    record = {"id": "val-0000000000", "source": "ucf101", "conversations": [
        {"images": frames, "user": "Classify the video into one of the following classes: Archery .", "assistant": "Archery"}]}
    (tmp_path / "ucf101_val.jsonl").write_text(json.dumps(record) + "\n")
    return tmp_path, tmp_path / "images" / frames[3]


def evaluation_set(root):
    return RecipeDataset(jsonl_eval_examples(root / "ucf101_val.jsonl", root / "images"), name="ucf101 val", for_training=False)


def test_the_validation_pass_names_the_truncated_frame(tiny_checkpoint, video_row):
    root, frame = video_row
    # Cut inside the header PIL reads on open, which it reports as "Truncated File Read" alone.
    frame.write_bytes(frame.read_bytes()[:30])
    processor = Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=1)
    with image_check_pool(2) as pool, pytest.raises(ExampleError) as stopped:
        validate_evaluation_data(evaluation_set(root), processor, None, pool)
    message = str(stopped.value)
    assert message.startswith(f"ucf101 val row 0 (id 'val-0000000000'): OSError: image file {frame} ")
    assert "\n" not in message


def test_a_frame_damaged_after_the_validation_pass_is_named_when_read(video_row):
    root, frame = video_row
    dataset = evaluation_set(root)
    # Cut inside the compressed pixels: the header opens, the decode fails.
    frame.write_bytes(frame.read_bytes()[:-200])
    with pytest.raises(ExampleError) as stopped:
        dataset[0]
    assert str(stopped.value).startswith(f"ucf101 val row 0 (id 'val-0000000000'): OSError: image file {frame} does not decode: ")
