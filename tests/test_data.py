"""JSONL custom data and RecipeDataset: exact examples, errors that name file:line or row, exact lengths."""

import io
import json
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from common.data.collator import Phi3VCollator
from common.data.conversation import encode_conversation
from common.data.dataset import RecipeDataset, jsonl_eval_examples, load_jsonl_conversations
from common.errors import DataError, ExampleError
from common.model.image_processing_phi3v import Phi3VImageProcessor
from common.model.processing_phi3v import Phi3VProcessor

NUM_CROPS = 4
PROMPT = "Classify the video into one of the following classes: Archery, BenchPress ."


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=NUM_CROPS)


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    sizes = {"train/Archery/v1.0.jpg": (320, 240), "train/Archery/v1.1.jpg": (320, 240), "docs/page.png": (200, 500)}
    for relative, size in sizes.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (30, 120, 200)).save(root / relative)
    return root


def write_jsonl(path, lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def turn(user, assistant, images=None):
    return {"user": user, "assistant": assistant} if images is None else {"images": images, "user": user, "assistant": assistant}


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


FRAMES = ["train/Archery/v1.0.jpg", "train/Archery/v1.1.jpg"]


def happy_lines():
    return [
        {"id": "train-0000000000", "source": "ucf101", "conversations": [turn(PROMPT, "Archery", FRAMES)]},
        {"id": "doc-1", "conversations": [turn("What is the total?", "42", ["docs/page.png"]), turn("And the date?", "May 1", [])]},
        "",
        {"id": "text-1", "source": "chat", "conversations": [turn("Say yes.", "yes")]},
        {"id": "tagged", "conversations": [turn("Compare <|image_1|> with <|image_2|>.", "same", ["docs/page.png", FRAMES[0]])]},
    ]


def test_jsonl_happy_path_gives_exact_examples(tmp_path, image_root):
    path = write_jsonl(tmp_path / "ucf101_train.jsonl", happy_lines())
    root = str(image_root.resolve())
    frame_0, frame_1, page = (os.path.join(root, *p.split("/")) for p in (*FRAMES, "docs/page.png"))

    assert load_jsonl_conversations(path, image_root) == [
        {
            "id": "train-0000000000",
            "source": "ucf101",
            "images": [frame_0, frame_1],
            "messages": [user(f"<|image_1|><|image_2|>\n{PROMPT}"), assistant("Archery")],
        },
        {
            "id": "doc-1",
            "source": None,
            "images": [page],
            "messages": [user("<|image_1|>\nWhat is the total?"), assistant("42"), user("And the date?"), assistant("May 1")],
        },
        {
            "id": "text-1",
            "source": "chat",
            "images": [],
            "messages": [user("Say yes."), assistant("yes")],
        },
        {
            "id": "tagged",
            "source": None,
            "images": [page, frame_0],
            "messages": [user("Compare <|image_1|> with <|image_2|>."), assistant("same")],
        },
    ]

    evaluation = jsonl_eval_examples(path, image_root)
    assert [e["id"] for e in evaluation] == ["train-0000000000", "doc-1", "text-1", "tagged"]
    assert evaluation[1] == {
        "id": "doc-1",
        "source": None,
        "images": [page],
        "messages": [user("<|image_1|>\nWhat is the total?")],
        "references": ["42"],
    }


def test_recipe_dataset_opens_images_lazily(tmp_path, image_root):
    rows = load_jsonl_conversations(write_jsonl(tmp_path / "d.jsonl", happy_lines()), image_root)
    dataset = RecipeDataset(rows, name="custom")
    assert len(dataset) == 4
    example = dataset[1]
    assert [im.size for im in example["images"]] == [(200, 500)]
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in example["images"])
    assert example["messages"] == rows[1]["messages"]
    # The rows keep their paths: decoding happens per item, never into the source.
    assert isinstance(rows[1]["images"][0], str)

    evaluation = RecipeDataset(jsonl_eval_examples(tmp_path / "d.jsonl", image_root), name="custom eval", for_training=False)
    assert evaluation[0]["references"] == ["Archery"] and len(evaluation[0]["images"]) == 2


def line(*turns, example_id="a"):
    return {"id": example_id, "conversations": list(turns)}


@pytest.mark.parametrize(
    "lines, message",
    [
        ([line(turn("q", "a")), '{"id": "b", "conversations": [}'], r"{path}:2: invalid JSON \(.* at column \d+\)"),
        (['["not", "an", "object"]'], r"{path}:1: expected a JSON object"),
        ([{"conversations": [turn("q", "a")]}], r"{path}:1: missing key 'id'"),
        ([{"id": "a"}], r"{path}:1: missing key 'conversations'"),
        ([line({"user": "q", "images": []})], r"{path}:1: conversations\[0\]: missing key 'assistant'"),
        ([line(turn("q", 3))], r"{path}:1: conversations\[0\]: 'assistant' must be a string"),
        ([line(turn("q", "a")), line(turn("q", "b"))], r"{path}:2: id 'a' is already used on line 1"),
        ([line(turn("q", "a"), turn("<|image_1|> q", "b", ["docs/page.png"]))], r"{path}:1: message 2 holds an image tag"),
        ([line(turn("<|image_2|> q", "a", ["docs/page.png"]))], r"{path}:1: the first user message has image tags \[2\]"),
        ([line(turn("q", " "))], r"{path}:1: message 1 \(assistant\) is empty"),
    ],
)
def test_jsonl_format_errors_name_file_and_line(tmp_path, image_root, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message.format(path=path)):
        load_jsonl_conversations(path, image_root)


def test_image_paths_must_stay_inside_the_root(tmp_path, image_root):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    os.symlink(outside, image_root / "link.png")
    cases = {
        str(outside): r"{path}:1: conversations\[0\].images\[0\]: image path .* is absolute; refused",
        "../secret.png": r"{path}:1: conversations\[0\].images\[0\]: image path '\.\./secret\.png' leads to .*secret\.png, outside",
        "docs/../../secret.png": r"{path}:1: .* outside the image root",
        "link.png": r"{path}:1: conversations\[0\].images\[0\]: image path 'link\.png' leads to .*secret\.png, outside the image root",
    }
    for image, message in cases.items():
        path = write_jsonl(tmp_path / "escape.jsonl", [line(turn("q", "a", [image]))])
        with pytest.raises(ValueError, match=message.format(path=path)):
            load_jsonl_conversations(path, image_root)


def test_missing_image_is_named_up_front(tmp_path, image_root):
    lines = happy_lines() + [line(turn("q", "a", ["docs/page.png"]), turn("r", "b", ["train/Archery/v9.3.jpg"]), example_id="gone")]
    path = write_jsonl(tmp_path / "missing.jsonl", lines)
    message = rf"{path}:6: conversations\[1\]\.images\[0\]: image file .*train/Archery/v9\.3\.jpg does not exist"
    with pytest.raises(FileNotFoundError, match=message):
        load_jsonl_conversations(path, image_root)
    with pytest.raises(FileNotFoundError, match="image root .* is not a folder"):
        load_jsonl_conversations(path, tmp_path / "nowhere")


def test_recipe_dataset_errors_name_row_and_id():
    rows = [{"id": "r0", "q": "fine"}, {"id": "r1"}, {"q": "no id"}]

    def to_example(row, index):
        return {"images": [], "messages": [user(row["q"]), assistant("a")]}

    dataset = RecipeDataset(rows, to_example, name="toy")
    assert dataset[0]["id"] == "r0"
    with pytest.raises(ExampleError, match=r"toy row 1 \(id 'r1'\): the row has no field 'q'; its fields are \['id'\]"):
        dataset[1]
    assert dataset[2]["id"] == "toy[2]"
    with pytest.raises(IndexError):
        dataset[3]

    tag_mismatch = RecipeDataset([{"id": "t", "images": ["x.png"], "messages": to_example({"q": "q"}, 0)["messages"]}], name="tags")
    message = r"tags row 0 \(id 't'\): ExampleError: the first user message has image tags \[\] but the example has 1 image"
    with pytest.raises(ExampleError, match=message):
        tag_mismatch[0]


def test_recipe_dataset_names_the_id_of_an_undecodable_row():
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
    good = io.BytesIO()
    Image.new("RGB", (8, 8)).save(good, format="PNG")
    source = datasets.Dataset.from_dict(
        {"id": ["ok", "broken"], "image": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"not an image", "path": None}]},
        features=features,
    )

    def to_example(row, index):
        return {"images": [row["image"]], "messages": [user("<|image_1|>\nq"), assistant("a")]}

    dataset = RecipeDataset(source, to_example, name="docs")
    assert dataset[0]["images"][0].size == (8, 8)
    with pytest.raises(ExampleError, match=r"docs row 1 \(id 'broken'\): UnidentifiedImageError"):
        dataset[1]


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """The formats of the image files whose pixels get decoded (each file once, however often load() runs)."""
    loads = []
    # Held, not just their ids: a freed image's id can be reused by the next one.
    decoded = []
    original = ImageFile.ImageFile.load

    def counting_load(self):
        if not any(image is self for image in decoded):
            decoded.append(self)
            loads.append(self.format)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return loads


def test_lengths_of_jsonl_examples_are_exact_without_decoding(tmp_path, image_root, processor, no_pixel_decoding):
    dataset = RecipeDataset(load_jsonl_conversations(write_jsonl(tmp_path / "d.jsonl", happy_lines()), image_root), name="custom")
    lengths = dataset.lengths(processor)
    assert no_pixel_decoding == []
    assert lengths == [len(encode_conversation(processor, dataset[i])) for i in range(len(dataset))]
    one_crop = Phi3VProcessor(Phi3VImageProcessor(num_crops=1), processor.tokenizer)
    assert dataset.lengths(one_crop) == [len(encode_conversation(one_crop, dataset[i])) for i in range(len(dataset))]


def jpeg_bytes(size, orientation=None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[Image.ExifTags.Base.Orientation] = orientation
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def test_lengths_of_a_hub_style_dataset_are_exact_without_decoding(processor, no_pixel_decoding):
    # The cauldron schema (images: list of Image, texts: list of turns); one JPEG is stored sideways with an
    # EXIF orientation that datasets turns upright on decode, which changes its tile layout.
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "texts": datasets.List({key: datasets.Value("string") for key in ("user", "assistant", "source")}),
        }
    )
    source = datasets.Dataset.from_dict(
        {
            "images": [
                [{"bytes": jpeg_bytes((900, 300)), "path": None}],
                [{"bytes": jpeg_bytes((900, 300), orientation=6), "path": None}, {"bytes": jpeg_bytes((50, 60)), "path": None}],
            ],
            "texts": [
                [{"user": "Is it hateful?", "assistant": "no", "source": "s"}],
                [
                    {"user": "True or false?", "assistant": "True", "source": "s"},
                    {"user": "And now?", "assistant": "False", "source": "s"},
                ],
            ],
        },
        features=features,
    )

    def to_example(row, index):
        tags = "".join(f"<|image_{k}|>" for k in range(1, len(row["images"]) + 1))
        messages = []
        for number, text in enumerate(row["texts"]):
            messages += [user((tags + "\n" if number == 0 else "") + text["user"]), assistant(text["assistant"])]
        return {"images": row["images"], "messages": messages}

    calls = []
    dataset = RecipeDataset(source, lambda row, index: calls.append(index) or to_example(row, index), name="cauldron")
    lengths = dataset.lengths(processor)
    # Only the sideways JPEG is decoded (to turn it upright, as datasets does); the others are read by header.
    assert no_pixel_decoding == ["JPEG"]
    assert dataset[1]["images"][0].size == (300, 900)
    assert lengths == [len(encode_conversation(processor, dataset[i])) for i in range(len(dataset))]

    calls.clear()
    assert dataset.lengths(processor) == lengths
    assert calls == []


def test_errors_from_dataloader_workers_are_the_same_one_line(tmp_path, processor):
    # A truncated JPEG that slipped past validation (e.g. damaged after it), read by a DataLoader worker.
    pixels = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "frame.jpg")
    data = (tmp_path / "frame.jpg").read_bytes()
    (tmp_path / "frame.jpg").write_bytes(data[: len(data) // 2])
    rows = [{"id": "clip-7", "images": [str(tmp_path / "frame.jpg")],
             "messages": [user("<|image_1|>\nWhich class?"), assistant("Archery")]}]
    dataset = RecipeDataset(rows, name="ucf101 train")
    with pytest.raises(DataError) as in_process:
        dataset[0]

    collator = Phi3VCollator(processor, max_length=20)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=collator)
    with pytest.raises(DataError) as from_worker:
        next(iter(loader))
    assert type(from_worker.value) is type(in_process.value)
    assert str(from_worker.value) == str(in_process.value)
    assert str(from_worker.value).startswith(
        f"ucf101 train row 0 (id 'clip-7'): OSError: image file {tmp_path / 'frame.jpg'} does not decode: image file is truncated"
    )
    assert "\n" not in str(from_worker.value)

    # The collator's errors too (here: an example over max_length).
    rows[0]["images"] = [Image.fromarray(pixels)]
    loader = torch.utils.data.DataLoader(RecipeDataset(rows, name="ucf101 train"), batch_size=1, num_workers=1, collate_fn=collator)
    with pytest.raises(DataError, match=r"^example 'clip-7' \(batch position 0\) is \d+ tokens long, more than max_length=20;[^\n]*$"):
        next(iter(loader))
