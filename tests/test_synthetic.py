"""The synthetic datasets match the real schemas of spec section 9 and are reproducible."""

import io
import re
import tarfile

import av
import numpy as np
import pytest
from datasets import DatasetDict, Features, Image, List, Value, load_from_disk
from PIL import Image as PILImage

from common.fixtures.synthetic import (
    decode_frame_index,
    main,
    make_docvqa,
    make_hateful_memes,
    make_nlvr2,
    make_video_frame,
    write_avi,
    write_ucf101_videos,
)

# Written out here rather than imported, so a drift of the module's schema fails the test.
EXPECTED_DOCVQA = Features(
    {
        "id": Value("string"),
        "image": Image(),
        "query": {
            "de": Value("string"),
            "en": Value("string"),
            "es": Value("string"),
            "fr": Value("string"),
            "it": Value("string"),
        },
        "answers": List(Value("string")),
        "words": List(Value("string")),
        "bounding_boxes": List(List(Value("float32"), length=4)),
        "answer": {
            "match_score": Value("float64"),
            "matched_text": Value("string"),
            "start": Value("int64"),
            "text": Value("string"),
        },
    }
)
EXPECTED_CAULDRON = Features(
    {
        "images": List(Image()),
        "texts": List({"user": Value("string"), "assistant": Value("string"), "source": Value("string")}),
    }
)


def _same_content(a: DatasetDict, b: DatasetDict) -> bool:
    return list(a) == list(b) and all(a[split].data.table.equals(b[split].data.table) for split in a)


def test_docvqa_schema_content_and_reload(tmp_path):
    dataset = make_docvqa(n=10, seed=3)
    assert list(dataset) == ["train", "test"]
    assert (dataset["train"].num_rows, dataset["test"].num_rows) == (10, 4)
    for split in dataset.values():
        assert split.features == EXPECTED_DOCVQA
    dataset.save_to_disk(str(tmp_path / "docvqa"))
    loaded = load_from_disk(str(tmp_path / "docvqa"))
    assert isinstance(loaded, DatasetDict)
    assert loaded["train"].features == EXPECTED_DOCVQA
    assert _same_content(dataset, loaded)

    rows = list(loaded["train"]) + list(loaded["test"])
    assert len({row["id"] for row in rows}) == len(rows)
    shapes = {"wide" if row["image"].width > row["image"].height else "tall" for row in rows}
    assert shapes == {"wide", "tall"}
    for row in rows:
        width, height = row["image"].size
        assert 200 <= min(width, height) and max(width, height) <= 700
        assert row["query"]["en"].endswith("?") and all(row["query"].values())
        assert 1 <= len(row["answers"]) <= 3
        # The first answer is drawn on the page, so it is in the words at the recorded start.
        drawn = row["answers"][0].split(" ")
        start = row["answer"]["start"]
        assert row["words"][start : start + len(drawn)] == drawn
        assert len(row["words"]) == len(row["bounding_boxes"])
        for x0, y0, x1, y1 in row["bounding_boxes"]:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


@pytest.mark.parametrize("make", [make_hateful_memes, make_nlvr2], ids=["hateful_memes", "nlvr2"])
def test_cauldron_schema_and_reload(tmp_path, make):
    dataset = make(n=12, seed=1)
    assert list(dataset) == ["train"]
    assert dataset["train"].features == EXPECTED_CAULDRON
    dataset.save_to_disk(str(tmp_path / "ds"))
    loaded = load_from_disk(str(tmp_path / "ds"))
    assert loaded["train"].features == EXPECTED_CAULDRON
    assert _same_content(dataset, loaded)


def test_hateful_memes_rows():
    rows = list(make_hateful_memes(n=40, seed=0)["train"])
    answers = [row["texts"][0]["assistant"] for row in rows]
    assert set(answers) == {"yes", "no"}
    for row in rows:
        assert len(row["images"]) == 1 and len(row["texts"]) == 1
        assert row["texts"][0]["source"] == "hateful_memes"
        # The label is readable from the frame colour: red for "yes", green for "no".
        red, green, _ = row["images"][0].convert("RGB").getpixel((0, 0))
        assert (red > green) == (row["texts"][0]["assistant"] == "yes")


def test_nlvr2_rows_have_two_images_and_several_statements():
    rows = list(make_nlvr2(n=30, seed=0)["train"])
    answers = set()
    for row in rows:
        assert len(row["images"]) == 2
        assert 2 <= len(row["texts"]) <= 4
        for turn in row["texts"]:
            assert turn["source"] == "nlvr2"
            assert turn["user"].endswith("true or false?")
            answers.add(turn["assistant"])
    assert answers == {"True", "False"}


@pytest.mark.parametrize("make", [make_docvqa, make_hateful_memes, make_nlvr2], ids=lambda f: f.__name__)
def test_deterministic_for_a_seed(make):
    assert _same_content(make(n=5, seed=7), make(n=5, seed=7))
    assert not _same_content(make(n=5, seed=7), make(n=5, seed=8))


def test_more_than_500_rows_are_cheap():
    dataset = make_hateful_memes(n=510, seed=0)
    assert dataset["train"].num_rows == 510


def test_cli_writes_a_loadable_dataset(tmp_path, capsys):
    main(["nlvr2", "--out", str(tmp_path / "nlvr2"), "--n", "3", "--seed", "2"])
    assert str(tmp_path / "nlvr2") in capsys.readouterr().out
    assert _same_content(load_from_disk(str(tmp_path / "nlvr2")), make_nlvr2(n=3, seed=2))
    with pytest.raises(SystemExit, match="not empty"):
        main(["nlvr2", "--out", str(tmp_path / "nlvr2")])
    with pytest.raises(SystemExit):
        main(["ucf101_videos", "--out", str(tmp_path / "v"), "--n", "3"])
    with pytest.raises(SystemExit):
        main(["docvqa", "--out", str(tmp_path / "d"), "--classes", "3"])


def test_frame_index_survives_avi_and_jpeg(tmp_path):
    # Indices out of order and at the extremes, so a decoder that merely counts frames would fail.
    indices = [0, 255, 1, 170, 85, 7, 128, 127, 64, 200, 3, 2]
    path = tmp_path / "index.avi"
    write_avi(path, (make_video_frame(i % 10, index) for i, index in enumerate(indices)))
    with av.open(str(path)) as container:
        decoded = [frame.to_image() for frame in container.decode(video=0)]
    assert [decode_frame_index(image) for image in decoded] == indices
    for image, index in zip(decoded, indices):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=75)
        assert decode_frame_index(PILImage.open(buffer)) == index


def test_ucf101_videos_tree_and_archive(tmp_path, capsys):
    main(["ucf101_videos", "--out", str(tmp_path), "--classes", "3", "--videos_per_class", "2"])
    assert str(tmp_path / "UCF101_subset") in capsys.readouterr().out
    root = tmp_path / "UCF101_subset"
    videos = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.avi"))
    assert len(videos) == 3 * 3 * 2
    assert {v.split("/")[0] for v in videos} == {"train", "val", "test"}
    assert {v.split("/")[1] for v in videos} == {"ApplyEyeMakeup", "ApplyLipstick", "Archery"}
    assert len({v.split("/")[2] for v in videos}) == len(videos)
    for video in videos:
        _, name, filename = video.split("/")
        assert re.fullmatch(rf"v_{name}_g\d\d_c\d\d\.avi", filename), video

    with tarfile.open(tmp_path / "UCF101_subset.tar.gz") as tar:
        names = tar.getnames()
    assert {n.split("/")[0] for n in names} == {"UCF101_subset"}
    assert sorted(n[len("UCF101_subset/") :] for n in names if n.endswith(".avi")) == videos

    # Each class looks different in every frame, and every frame carries its own index.
    class_colours = {}
    lengths = set()
    for video in videos:
        with av.open(str(root / video)) as container:
            frames = [frame.to_image() for frame in container.decode(video=0)]
        lengths.add(len(frames))
        assert 12 <= len(frames) <= 40
        assert [decode_frame_index(frame) for frame in frames] == list(range(len(frames)))
        top = np.asarray(frames[0])[: frames[0].height // 2].reshape(-1, 3)
        class_colours.setdefault(video.split("/")[1], []).append(np.median(top, axis=0))
    assert len(lengths) > 1
    means = {name: np.mean(colours, axis=0) for name, colours in class_colours.items()}
    names = sorted(means)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(means[a] - means[b]).max() > 60, (a, b, means[a], means[b])


def test_ucf101_videos_reproducible_frame_counts(tmp_path):
    first = write_ucf101_videos(tmp_path / "a", classes=2, videos_per_class=1, seed=5)
    second = write_ucf101_videos(tmp_path / "b", classes=2, videos_per_class=1, seed=5)
    assert first.frame_counts == second.frame_counts
    assert (tmp_path / "a" / "UCF101_subset.tar.gz").read_bytes() == (tmp_path / "b" / "UCF101_subset.tar.gz").read_bytes()
    with pytest.raises(FileExistsError):
        write_ucf101_videos(tmp_path / "a", classes=2)
