"""convert_ucf101.py on synthetic videos: exact output, frame sampling, bad input, resume, unsafe archives."""

import io
import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageFile

import convert_ucf101
from common.data.safe_archive import safe_extract_tar
from common.fixtures.synthetic import decode_frame_index, write_ucf101_videos

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "convert_ucf101.py"
CLASSES = ["ApplyEyeMakeup", "ApplyLipstick", "Archery"]
PROMPT = "Classify the video into one of the following classes: ApplyEyeMakeup, ApplyLipstick, Archery ."
OLD_MTIME = 1_000_000_000


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_ucf101_videos(tmp_path_factory.mktemp("syn"), classes=3, videos_per_class=2, seed=0)


def arange_indices(n: int, k: int = 8) -> list[int]:
    return [int(i) for i in np.floor(np.arange(0, n, n / k))]


def videos_of(root: Path, split: str) -> list[Path]:
    return sorted((root / split).glob("*/*.avi"), key=lambda p: (p.parent.name, p.name))


def expected_lines(root: Path, split: str, skip: tuple[str, ...] = ()) -> list[str]:
    lines = []
    for index, video in enumerate(videos_of(root, split)):
        if video.name in skip:
            continue
        cls = video.parent.name
        record = {
            "id": f"{split}-{index:010d}",
            "source": "ucf101",
            "conversations": [
                {
                    "images": [f"{split}/{cls}/{video.stem}.{i}.jpg" for i in range(8)],
                    "user": PROMPT,
                    "assistant": cls,
                }
            ],
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    return lines


def jsonl_lines(out: Path, split: str) -> list[str]:
    return (out / f"ucf101_{split}.jsonl").read_text().splitlines()


def image_files(out: Path) -> set[str]:
    return {p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*") if p.is_file()}


def expected_images(root: Path, skip: tuple[str, ...] = ()) -> set[str]:
    return {
        f"{split}/{video.parent.name}/{video.stem}.{i}.jpg"
        for split in ("train", "val", "test")
        for video in videos_of(root, split)
        if video.name not in skip
        for i in range(8)
    }


def check_complete_output(out: Path, root: Path, frame_counts: dict[str, int], skip: tuple[str, ...] = ()):
    for split in ("train", "val", "test"):
        assert jsonl_lines(out, split) == expected_lines(root, split, skip)
    assert image_files(out) == expected_images(root, skip)
    # The written frames are the spec's samples of each video's real frame count.
    for rel, count in frame_counts.items():
        split, cls, name = rel.split("/")
        if name in skip:
            continue
        stem = name[: -len(".avi")]
        got = [decode_frame_index(Image.open(out / "images" / split / cls / f"{stem}.{i}.jpg")) for i in range(8)]
        assert got == arange_indices(count), rel
    assert not list(out.glob(".ucf101_extract_*"))


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )


def patch_avi_frame_count(path: Path, count: int) -> None:
    """Make the AVI headers (avih total frames, strh length) claim `count` frames, as broken files do."""
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, data.index(b"avih") + 8 + 16, count)
    struct.pack_into("<I", data, data.index(b"strh") + 8 + 32, count)
    path.write_bytes(bytes(data))


def test_sample_frame_indices_match_the_spec():
    assert convert_ucf101.sample_frame_indices(8, 8) == list(range(8))
    assert convert_ucf101.sample_frame_indices(12, 8) == [0, 1, 3, 4, 6, 7, 9, 10]
    assert convert_ucf101.sample_frame_indices(40, 8) == [0, 5, 10, 15, 20, 25, 30, 35]
    for n in range(8, 300):
        assert convert_ucf101.sample_frame_indices(n, 8) == arange_indices(n)
    # np.arange(0, 17, 17 / 7) has 8 elements through float rounding; only 7 samples are taken.
    assert convert_ucf101.sample_frame_indices(17, 7) == [0, 2, 4, 7, 9, 12, 14]
    with pytest.raises(ValueError):
        convert_ucf101.sample_frame_indices(7, 8)


def test_video_dir_as_a_script(synthetic, tmp_path):
    out = tmp_path / "out"
    # The parent folder holding UCF101_subset/ is accepted; two workers exercise the process pool.
    result = run_script("--out_dir", str(out), "--video_dir", str(synthetic.root.parent), "--num_workers", "2")
    assert result.returncode == 0, result.stderr
    for split in ("train", "val", "test"):
        assert f"{split}: 6 videos converted (0 reused from an earlier run), 0 skipped" in result.stdout
    check_complete_output(out, synthetic.root, synthetic.frame_counts)
    frames = ", ".join(f'"train/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.{i}.jpg"' for i in range(8))
    assert jsonl_lines(out, "train")[0] == (
        '{"id": "train-0000000000", "source": "ucf101", "conversations": [{"images": [' + frames + '], '
        '"user": "Classify the video into one of the following classes: ApplyEyeMakeup, ApplyLipstick, Archery .", '
        '"assistant": "ApplyEyeMakeup"}]}'
    )
    assert sorted(p.name for p in out.iterdir()) == [
        ".convert_ucf101.json", "images", "ucf101_test.jsonl", "ucf101_train.jsonl", "ucf101_val.jsonl"
    ]


def test_archive(synthetic, tmp_path):
    out = tmp_path / "out"
    assert convert_ucf101.main(["--out_dir", str(out), "--archive", str(synthetic.archive), "--num_workers", "1"]) == 0
    check_complete_output(out, synthetic.root, synthetic.frame_counts)


def test_splits_subset_keeps_the_full_class_list(synthetic, tmp_path):
    out = tmp_path / "out"
    args = ["--out_dir", str(out), "--video_dir", str(synthetic.root), "--splits", "val", "--num_workers", "0"]
    assert convert_ucf101.main(args) == 0
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["ucf101_val.jsonl"]
    assert jsonl_lines(out, "val") == expected_lines(synthetic.root, "val")
    assert convert_ucf101.main(["--out_dir", str(out), "--video_dir", str(synthetic.root), "--splits", "nope"]) == 1


def test_corrupt_and_misreporting_videos(synthetic, tmp_path, caplog):
    root = tmp_path / "UCF101_subset"
    shutil.copytree(synthetic.root, root)
    counts = dict(synthetic.frame_counts)
    # Sorted first in its class, so the ids after it keep their positions and show a gap.
    corrupt = root / "train" / "ApplyLipstick" / "v_ApplyLipstick_g00_c00.avi"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    # Headers that overstate, zero and understate the count: the decoded count must win every time.
    misreports = {"train/Archery": 250, "val/Archery": 0, "test/Archery": 9}
    for folder, claim in misreports.items():
        video = sorted((root / folder).glob("*.avi"))[0]
        patch_avi_frame_count(video, claim)
        with av.open(str(video)) as container:
            assert container.streams.video[0].frames == claim
        indices, frames = convert_ucf101.read_sampled_frames(video, 8)
        true_count = counts[f"{folder}/{video.name}"]
        assert indices == arange_indices(true_count)
        assert [decode_frame_index(frames[i]) for i in indices] == indices

    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        code = convert_ucf101.main(["--out_dir", str(out), "--video_dir", str(root), "--num_workers", "1"])
    assert code == 0
    assert str(corrupt) in caplog.text and "skipping" in caplog.text
    check_complete_output(out, root, counts, skip=(corrupt.name,))
    ids = [json.loads(line)["id"] for line in jsonl_lines(out, "train")]
    assert ids == [f"train-{i:010d}" for i in (0, 1, 3, 4, 5, 6)]


def test_summary_counts_skips_and_all_bad_input_fails(synthetic, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(synthetic.root, root)
    bad = root / "val" / "Archery" / "v_Archery_zz_c01.avi"
    bad.write_bytes(os.urandom(3000))
    result = run_script("--out_dir", str(tmp_path / "out"), "--video_dir", str(root), "--num_workers", "1")
    assert result.returncode == 0, result.stderr
    assert f"skipping {bad}" in result.stderr
    assert "val: 6 videos converted (0 reused from an earlier run), 1 skipped" in result.stdout

    all_bad = tmp_path / "bad" / "train" / "Archery"
    all_bad.mkdir(parents=True)
    (all_bad / "v_Archery_g01_c01.avi").write_bytes(os.urandom(3000))
    (all_bad / "v_Archery_g01_c02.avi").write_bytes(b"")
    result = run_script("--out_dir", str(tmp_path / "out2"), "--video_dir", str(tmp_path / "bad"), "--splits", "train")
    assert result.returncode != 0
    assert "train: 0 videos converted (0 reused from an earlier run), 2 skipped" in result.stdout
    assert "no video could be converted" in result.stderr


def test_resume_reuses_frames_and_overwrite_redoes_them(synthetic, tmp_path, caplog):
    out = tmp_path / "out"
    args = ["--out_dir", str(out), "--video_dir", str(synthetic.root), "--num_workers", "1"]
    assert convert_ucf101.main(args) == 0
    frames = sorted((out / "images").rglob("*.jpg"))
    for frame in frames:
        os.utime(frame, (OLD_MTIME, OLD_MTIME))
    # An interrupted run: one video half written, a JSONL missing.
    interrupted = sorted((out / "images" / "val" / "Archery").glob("*.jpg"))[:3]
    for frame in interrupted:
        frame.unlink()
    (out / "ucf101_val.jsonl").unlink()

    assert convert_ucf101.main(args) == 0
    check_complete_output(out, synthetic.root, synthetic.frame_counts)
    redone = {f for f in frames if f.stat().st_mtime != OLD_MTIME}
    assert redone == set(sorted((out / "images" / "val" / "Archery").glob(interrupted[0].name.split(".")[0] + ".*.jpg")))

    with caplog.at_level("ERROR"):
        assert convert_ucf101.main([*args, "--num_frames", "4"]) == 1
    assert "--overwrite" in caplog.text

    (out / "images" / "stray.jpg").write_bytes(b"")
    assert convert_ucf101.main([*args, "--overwrite"]) == 0
    check_complete_output(out, synthetic.root, synthetic.frame_counts)
    assert all(f.stat().st_mtime != OLD_MTIME for f in frames)
    assert not (out / "images" / "stray.jpg").exists()


def frames_of(out: Path, split: str, video: Path) -> list[Path]:
    return [out / "images" / split / video.parent.name / f"{video.stem}.{i}.jpg" for i in range(8)]


def test_rerun_redoes_videos_with_an_empty_or_truncated_frame(synthetic, tmp_path, caplog, capsys):
    out = tmp_path / "out"
    args = ["--out_dir", str(out), "--video_dir", str(synthetic.root), "--num_workers", "1"]
    assert convert_ucf101.main(args) == 0
    frames = sorted((out / "images").rglob("*.jpg"))
    before = {frame: frame.read_bytes() for frame in frames}
    # What an earlier run can leave under the final names: data lost in a power cut (no fsync), or a
    # converter that wrote in place and was killed.
    empty_video, truncated_video = videos_of(synthetic.root, "train")[4], videos_of(synthetic.root, "val")[1]
    empty, truncated = frames_of(out, "train", empty_video)[5], frames_of(out, "val", truncated_video)[3]
    empty.write_bytes(b"")
    truncated.write_bytes(before[truncated][: len(before[truncated]) // 2])
    for frame in frames:
        os.utime(frame, (OLD_MTIME, OLD_MTIME))
    capsys.readouterr()

    with caplog.at_level("WARNING"):
        assert convert_ucf101.main(args) == 0
    check_complete_output(out, synthetic.root, synthetic.frame_counts)
    redone = {frame for frame in frames if frame.stat().st_mtime != OLD_MTIME}
    assert redone == {*frames_of(out, "train", empty_video), *frames_of(out, "val", truncated_video)}
    # Re-extraction writes the very bytes of the first run; intact frames were not rewritten at all.
    assert all(frame.read_bytes() == data for frame, data in before.items())
    empty_name, truncated_name = (frame.relative_to(out / "images").as_posix() for frame in (empty, truncated))
    assert f"re-extracting the frames of {empty_video}: {empty_name} is empty (0 bytes)" in caplog.text
    assert f"re-extracting the frames of {truncated_video}: {truncated_name} is truncated (" in caplog.text
    stdout = capsys.readouterr().out
    assert "train: 6 videos converted (5 reused from an earlier run), 0 skipped" in stdout
    assert "val: 6 videos converted (5 reused from an earlier run), 0 skipped" in stdout
    assert "test: 6 videos converted (6 reused from an earlier run), 0 skipped" in stdout


@pytest.mark.parametrize("load_truncated", [False, True], ids=["default", "LOAD_TRUNCATED_IMAGES"])
def test_frame_check_rejects_every_truncation(tmp_path, monkeypatch, load_truncated):
    # Training code often switches this on globally; the check must not depend on it being off.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    frame = tmp_path / "frame.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    Image.fromarray(noise).save(frame, format="JPEG", quality=convert_ucf101.JPEG_QUALITY)
    data = frame.read_bytes()
    assert convert_ucf101.frame_problem(frame) is None
    for cut in (0, 1, 2, 3, 100, len(data) // 2, len(data) - 2, len(data) - 1):
        frame.write_bytes(data[:cut])
        assert convert_ucf101.frame_problem(frame) is not None, cut
    frame.write_bytes(bytes(len(data) - 2) + convert_ucf101.JPEG_END_MARKER)
    assert convert_ucf101.frame_problem(frame).startswith("does not decode (UnidentifiedImageError")
    assert convert_ucf101.frame_problem(tmp_path / "missing.jpg").startswith("cannot be read (FileNotFoundError")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"])
def test_outputs_get_the_umask_permissions(synthetic, tmp_path, umask, mode):
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        args = ["--out_dir", str(out), "--video_dir", str(synthetic.root), "--splits", "val", "--num_workers", "0"]
        assert convert_ucf101.main(args) == 0
    finally:
        os.umask(previous)
    modes = {oct(stat.S_IMODE(path.stat().st_mode)) for path in out.rglob("*") if path.is_file()}
    assert modes == {oct(mode)}


# Runs the converter with a JPEG writer that puts half of a frame's bytes in the file it is given and then
# SIGKILLs the process, as a kill mid-write would.
KILL_MID_FRAME = """
import io, os, signal, sys
from PIL import Image, JpegImagePlugin
import convert_ucf101

kill_at, written = int(sys.argv[1]), 0
real_save = Image.SAVE["JPEG"]

def save_or_die(image, fp, filename):
    global written
    written += 1
    if written < kill_at:
        return real_save(image, fp, filename)
    encoded = io.BytesIO()
    real_save(image, encoded, filename)
    fp.write(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    fp.flush()
    os.kill(os.getpid(), signal.SIGKILL)

Image.SAVE["JPEG"] = save_or_die
convert_ucf101.main(sys.argv[2:])
"""


def test_a_kill_mid_frame_leaves_no_partial_frame_and_the_rerun_completes(synthetic, tmp_path):
    out = tmp_path / "out"
    args = ["--out_dir", str(out), "--video_dir", str(synthetic.root), "--num_workers", "0"]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_MID_FRAME, "11", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    first, second = videos_of(synthetic.root, "train")[:2]
    # The first video and two frames of the second were written; the third is only its temporary file.
    on_disk = sorted((out / "images").rglob("*.jpg"))
    assert on_disk == sorted([*frames_of(out, "train", first), *frames_of(out, "train", second)[:2]])
    assert all(convert_ucf101.frame_problem(frame) is None for frame in on_disk)
    partial = frames_of(out, "train", second)[2]
    assert (partial.parent / (partial.name + convert_ucf101.PARTIAL_SUFFIX)).stat().st_size > 0
    for frame in on_disk:
        os.utime(frame, (OLD_MTIME, OLD_MTIME))

    assert convert_ucf101.main(args) == 0
    check_complete_output(out, synthetic.root, synthetic.frame_counts)
    assert not list(out.rglob(f"*{convert_ucf101.PARTIAL_SUFFIX}"))
    assert all(frame.stat().st_mtime == OLD_MTIME for frame in frames_of(out, "train", first))


def _tar_with(path: Path, name: str, payload: bytes = b"evil") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("UCF101_subset/train/Archery/ok.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_converter_refuses_unsafe_archives(tmp_path, kind, caplog):
    work = tmp_path / "work"
    out = work / "out"
    target = {"dotdot": "../evil", "absolute": str(tmp_path / "evil_abs")}[kind]
    archive = _tar_with(tmp_path / "bad.tar.gz", target)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with caplog.at_level("ERROR"):
        assert convert_ucf101.main(["--out_dir", str(out), "--archive", str(archive), "--num_workers", "1"]) == 1
    assert f"{archive}: refusing to extract member {target!r}" in caplog.text
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.is_relative_to(work))
    assert after == before
    assert not (out / "evil").exists() and not list(out.glob(".ucf101_extract_*"))
    assert not Path(str(tmp_path / "evil_abs")).exists()


def _link_tar(path: Path, *members: tuple[str, bytes, str]) -> Path:
    """Members are (type, name, link target); type is one of file, sym, hard, chr."""
    types = {"file": tarfile.REGTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE}
    with tarfile.open(path, "w") as tar:
        for kind, name, target in members:
            info = tarfile.TarInfo(name)
            info.type = types[kind]
            info.linkname = target
            tar.addfile(info, io.BytesIO(b"") if kind == "file" else None)
    return path


@pytest.mark.parametrize(
    "members, offender",
    [
        ([("sym", "link", "/etc")], "link"),
        ([("sym", "a/link", "../../outside")], "a/link"),
        ([("file", "x", ""), ("hard", "h", "../x")], "h"),
        ([("chr", "dev", "")], "dev"),
        # Each link is lexically inside, but "a" resolves through "b" to the parent of the destination:
        # only the data filter's check against the disk catches it.
        ([("sym", "b", "."), ("sym", "a", "b/.."), ("file", "a/escaped", "")], "a"),
    ],
    ids=["absolute-symlink", "escaping-symlink", "escaping-hardlink", "device", "symlink-chain"],
)
def test_safe_extract_tar_refuses(tmp_path, members, offender):
    archive = _link_tar(tmp_path / "bad.tar", *members)
    dest = tmp_path / "sandbox" / "dest"
    with pytest.raises(ValueError, match=re.escape(str(archive)) + f".*member '{offender}'"):
        safe_extract_tar(archive, dest)
    assert not (tmp_path / "sandbox" / "escaped").exists() and not (tmp_path / "sandbox" / "outside").exists()


def test_safe_extract_tar_keeps_safe_links(tmp_path):
    archive = _link_tar(tmp_path / "ok.tar", ("file", "d/x", ""), ("sym", "d/link", "x"), ("hard", "d/hard", "d/x"))
    assert safe_extract_tar(archive, tmp_path / "dest") == ["d/x", "d/link", "d/hard"]
    assert (tmp_path / "dest" / "d" / "link").is_symlink()


def test_offline_download_error_names_the_local_options(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_script("--out_dir", str(tmp_path / "out"), env=env)
    assert result.returncode != 0
    assert "sayakpaul/ucf101-subset" in result.stderr
    assert "--archive" in result.stderr and "--video_dir" in result.stderr
