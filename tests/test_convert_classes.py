"""convert_ucf101.py: a class without a usable video is no answer option."""

import json
import os
import shutil

import convert_ucf101
from common.fixtures.synthetic import write_ucf101_videos


def test_a_class_without_a_decodable_video_is_left_out_with_a_warning(tmp_path, caplog):
    root = write_ucf101_videos(tmp_path / "syn", classes=3, videos_per_class=1, seed=0).root
    for video in root.glob("*/ApplyLipstick/*.avi"):
        video.write_bytes(os.urandom(3000))
    shutil.rmtree(root / "test" / "ApplyLipstick")
    (root / "train" / "Bowling").mkdir()
    (root / "test" / "Bowling").mkdir()
    # Only in a split folder this run leaves alone: kept, as a conversion of that split would keep it.
    shutil.copytree(root / "val" / "Archery", root / "test" / "Basketball")
    shutil.copytree(root / "val", root / "extra")
    out = tmp_path / "out"
    args = ["--out_dir", str(out), "--video_dir", str(root), "--splits", "train", "val", "extra", "--num_workers", "1"]
    with caplog.at_level("WARNING"):
        assert convert_ucf101.main(args) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "class " in r.getMessage()]
    assert warnings == [
        f"class ApplyLipstick has no video that decodes (its videos in {root / 'train' / 'ApplyLipstick'}, "
        f"{root / 'val' / 'ApplyLipstick'}, {root / 'extra' / 'ApplyLipstick'} were all skipped): left out of the "
        "classes and of every prompt",
        "class Bowling has no video that decodes (no video of it was found): left out of the classes and of every prompt",
    ]
    prompt = "Classify the video into one of the following classes: ApplyEyeMakeup, Archery, Basketball ."
    for split in ("train", "val", "extra"):
        rows = [json.loads(line) for line in (out / f"ucf101_{split}.jsonl").read_text().splitlines()]
        assert [row["conversations"][0]["assistant"] for row in rows] == ["ApplyEyeMakeup", "Archery"], split
        assert {row["conversations"][0]["user"] for row in rows} == {prompt}
