"""Convert the UCF-101 subset into sampled JPEG frames plus one JSONL file per split.

Launch (from the repository root):

    # default source: UCF101_subset.tar.gz of the hub dataset repo sayakpaul/ucf101-subset (171 MB)
    python convert_ucf101.py --out_dir data/ucf101
    # offline, from the archive downloaded earlier
    python convert_ucf101.py --out_dir data/ucf101 --archive /path/to/UCF101_subset.tar.gz
    # from an extracted tree ({train,val,test}/{Class}/*.avi, or its parent holding UCF101_subset/)
    python convert_ucf101.py --out_dir data/ucf101 --video_dir /path/to/UCF101_subset --num_workers 8
    # a small synthetic stand-in, for trying the pipeline without the real data
    python -m common.synthetic ucf101_videos --out /tmp/syn_ucf --classes 3
    python convert_ucf101.py --out_dir /tmp/ucf101 --video_dir /tmp/syn_ucf --num_frames 8

Output in --out_dir:

    images/{split}/{Class}/{video_stem}.{i}.jpg      i = 0 .. num_frames - 1
    ucf101_{split}.jsonl                             one line per converted video:
    {"id": "train-0000000000", "source": "ucf101", "conversations": [{"images": ["train/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.0.jpg", ...], "user": "Classify the video into one of the following classes: ApplyEyeMakeup, ApplyLipstick, ... .", "assistant": "ApplyEyeMakeup"}]}

Image paths are relative to `out_dir/images`. Videos are taken in sorted (split, class, file name)
order; the id's number is the video's position in that order within its split, counted over every
video found, so a video that fails to decode leaves a gap instead of renumbering the ones after it.
Frames are sampled at floor(arange(0, n, n / num_frames)) with n the number of frames a full decode
yields (containers' frame counts are only trusted when decoding agrees).

Rerunning into the same --out_dir resumes: videos whose frames are all present and decode completely are
reused, the rest are converted (a warning names any frame that was present but empty, truncated or
undecodable), and each JSONL is replaced atomically once every split is done. --overwrite starts afresh.

The prompt lists the classes that some converted video has as its answer (and those of split folders left out
by --splits, whose videos are not decoded then); a class whose videos all fail to decode, or whose folders
hold none, is left out with a warning.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import HfArgumentParser

HUB_REPO_ID = "sayakpaul/ucf101-subset"
HUB_FILENAME = "UCF101_subset.tar.gz"
TOP_FOLDER = "UCF101_subset"
STANDARD_SPLITS = ("train", "val", "test")
SETTINGS_FILE = ".convert_ucf101.json"
EXTRACT_PREFIX = ".ucf101_extract_"
PARTIAL_SUFFIX = ".partial"
JPEG_QUALITY = 95
JPEG_END_MARKER = b"\xff\xd9"

logger = logging.getLogger("convert_ucf101")


@dataclass
class ConvertArguments:
    out_dir: str = field(metadata={"help": "Output folder for images/ and ucf101_{split}.jsonl."})
    archive: str | None = field(
        default=None, metadata={"help": "Local UCF101_subset.tar.gz to read instead of downloading it."}
    )
    video_dir: str | None = field(
        default=None,
        metadata={"help": "Extracted tree holding {train,val,test}/{Class}/*.avi, or its parent folder."},
    )
    num_frames: int = field(default=8, metadata={"help": "Frames sampled per video."})
    num_workers: int = field(
        default_factory=lambda: min(4, os.cpu_count() or 1),
        metadata={"help": "Decoding processes; 0 or 1 decodes in this process."},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Delete this converter's previous output in out_dir first."}
    )
    splits: list[str] = field(
        default_factory=lambda: list(STANDARD_SPLITS), metadata={"help": "Split folders to convert."}
    )


class ConversionError(Exception):
    """A problem with the inputs or settings that the user has to fix; main() prints it and exits 1."""


class UnusableVideo(Exception):
    """A video that decodes but cannot give the sampled frames; it is skipped with a warning."""


@dataclass(frozen=True)
class VideoJob:
    split: str
    class_name: str
    path: Path
    index: int

    @property
    def stem(self) -> str:
        return self.path.stem

    def frame_names(self, num_frames: int) -> list[str]:
        """Frame paths relative to out_dir/images, as they appear in the JSONL."""
        return [f"{self.split}/{self.class_name}/{self.stem}.{i}.jpg" for i in range(num_frames)]


@dataclass
class SplitSummary:
    converted: int = 0
    reused: int = 0
    skipped: list[str] = field(default_factory=list)
    # The videos whose frames are written, in order: the split's JSONL rows.
    usable: list[VideoJob] = field(default_factory=list)


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """The recipe's sampling: floor(arange(0, n, n / num_frames)), i.e. num_frames evenly spaced frames."""
    if total_frames < num_frames:
        raise ValueError(f"{total_frames} frames cannot give {num_frames} distinct samples")
    # Float rounding in arange can add one element past the end for some n; the first num_frames are the
    # evenly spaced ones.
    return [int(i) for i in np.floor(np.arange(0, total_frames, total_frames / num_frames))[:num_frames]]


def build_prompt(classes: list[str]) -> str:
    return f"Classify the video into one of the following classes: {', '.join(classes)} ."


def _subfolders(folder: Path) -> list[Path]:
    # Dot folders are archive debris (e.g. macOS metadata), never classes or splits.
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def locate_root(video_dir: Path, splits: list[str]) -> Path:
    """The folder that directly holds the split folders: video_dir itself or its single top folder."""
    if not video_dir.is_dir():
        raise ConversionError(f"--video_dir {video_dir} is not a folder")
    if any((video_dir / split).is_dir() for split in splits):
        return video_dir
    children = _subfolders(video_dir)
    if len(children) == 1 and any((children[0] / split).is_dir() for split in splits):
        return children[0]
    found = ", ".join(p.name for p in children) or "no folders"
    raise ConversionError(
        f"{video_dir} holds neither the split folders {splits} nor one top folder (like {TOP_FOLDER}/) "
        f"containing them; found {found}. Point --video_dir at the folder with train/, val/, test/."
    )


def find_videos(root: Path, splits: list[str]) -> tuple[list[str], dict[str, list[VideoJob]]]:
    """The sorted class names (over every split folder present) and the videos of each requested split."""
    missing = [split for split in splits if not (root / split).is_dir()]
    if missing:
        present = ", ".join(p.name for p in _subfolders(root)) or "none"
        raise ConversionError(
            f"{root} has no folder for split(s) {missing} (split folders present: {present}); "
            "pass --splits with the ones that exist"
        )
    classes: set[str] = set()
    for split in dict.fromkeys([*STANDARD_SPLITS, *splits]):
        if (root / split).is_dir():
            classes.update(p.name for p in _subfolders(root / split))
    if not classes:
        raise ConversionError(f"{root}: no class folders in the split folders {splits}")
    jobs: dict[str, list[VideoJob]] = {}
    for split in splits:
        videos = [
            (class_dir.name, path)
            for class_dir in _subfolders(root / split)
            for path in sorted(class_dir.iterdir())
            if path.is_file() and path.suffix.lower() == ".avi"
        ]
        jobs[split] = [VideoJob(split, name, path, index) for index, (name, path) in enumerate(videos)]
    return sorted(classes), jobs


def _keep_frames(container: av.container.InputContainer, wanted: set[int], last: int | None) -> tuple[dict, int]:
    """Decode the first video stream, keeping frames at `wanted` indices as PIL images.

    Returns (index -> image, frames decoded); decoding stops after frame `last` when given, else it runs
    to the end so that the count is the true one.
    """
    frames = {}
    decoded = 0
    for decoded, frame in enumerate(container.decode(container.streams.video[0]), start=1):
        if decoded - 1 in wanted:
            frames[decoded - 1] = frame.to_image()
        if last is not None and decoded - 1 >= last:
            break
    return frames, decoded


def read_sampled_frames(path: Path, num_frames: int) -> tuple[list[int], dict]:
    """The sampled frame indices of a video and the frames themselves (index -> PIL image).

    Raises UnusableVideo when the video has fewer than num_frames frames, av.FFmpegError when it cannot
    be decoded.
    """
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise UnusableVideo("it has no video stream")
        claimed = container.streams.video[0].frames or 0
        # One pass normally suffices: it keeps the frames that the container's count implies and counts
        # the frames. Only when the count was wrong (containers misreport) is a second pass needed.
        guess = sample_frame_indices(claimed, num_frames) if claimed >= num_frames else []
        frames, total = _keep_frames(container, set(guess), last=None)
    if total < num_frames:
        raise UnusableVideo(f"it decodes to {total} frames, fewer than --num_frames {num_frames}")
    indices = sample_frame_indices(total, num_frames)
    if indices != guess:
        with av.open(str(path)) as container:
            frames, _ = _keep_frames(container, set(indices), last=indices[-1])
    if len(frames) != num_frames:
        raise UnusableVideo(f"a second decoding gave {len(frames)} of the {num_frames} frames it gave before")
    return indices, frames


def _write_jpeg(image: Image.Image, path: Path) -> None:
    # Written under a temporary name in the same folder and renamed, so a killed run never leaves a partial
    # frame under its final name. Without an fsync a power loss still can, which is why reuse decodes every
    # frame rather than trusting this. PIL creates the file with open(), so it gets the umask's permissions
    # like any other output (tempfile.mkstemp would make it 0600, unreadable to other users of the data).
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    image.save(partial, format="JPEG", quality=JPEG_QUALITY)
    os.replace(partial, path)


def convert_video(job: VideoJob, images_dir: Path, num_frames: int) -> str | None:
    """Sample and write one video's frames; returns None on success or why the video was skipped."""
    try:
        indices, frames = read_sampled_frames(job.path, num_frames)
    except UnusableVideo as error:
        return str(error)
    except (av.FFmpegError, OSError) as error:
        return f"it cannot be decoded ({type(error).__name__}: {error})"
    (images_dir / job.split / job.class_name).mkdir(parents=True, exist_ok=True)
    for name, index in zip(job.frame_names(num_frames), indices):
        _write_jpeg(frames[index], images_dir / name)
    return None


def _convert_job(payload: tuple[VideoJob, Path, int]) -> str | None:
    return convert_video(*payload)


def frame_problem(path: Path) -> str | None:
    """Why the existing frame file at `path` cannot be reused, or None when it decodes completely."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return f"cannot be read ({type(error).__name__}: {error})"
    if not data:
        return "is empty (0 bytes)"
    # A full decode alone would accept a truncated file wherever PIL's LOAD_TRUNCATED_IMAGES is switched on
    # (a common setting in training code); every JPEG this converter writes ends with the marker.
    if not data.endswith(JPEG_END_MARKER):
        return f"is truncated ({len(data)} bytes, no JPEG end marker)"
    # Broad on purpose: whatever PIL raises on a damaged file, re-extracting the frame is the remedy.
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as error:
        return f"does not decode ({type(error).__name__}: {error})"
    return None


def _reusable(job: VideoJob, images_dir: Path, num_frames: int) -> bool:
    """Whether all of a video's frames exist and decode; warns about any that exist but are damaged."""
    names = job.frame_names(num_frames)
    # A missing frame means an interrupted conversion, redone anyway: no need to decode the others.
    if not all((images_dir / name).is_file() for name in names):
        return False
    damaged = [f"{name} {problem}" for name in names if (problem := frame_problem(images_dir / name))]
    if damaged:
        logger.warning("re-extracting the frames of %s: %s", job.path, "; ".join(damaged))
    return not damaged


def _write_jsonl(path: Path, records: list[dict]) -> None:
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(partial, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(partial, path)


def _previous_outputs(out_dir: Path) -> list[Path]:
    patterns = ("images", "ucf101_*.jsonl", f"ucf101_*.jsonl{PARTIAL_SUFFIX}", SETTINGS_FILE, f"{EXTRACT_PREFIX}*")
    return sorted({path for pattern in patterns for path in out_dir.glob(pattern)})


def _prepare_out_dir(args: ConvertArguments, out_dir: Path) -> None:
    """Apply --overwrite, clear leftovers of interrupted runs, and refuse to mix different settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        for path in _previous_outputs(out_dir):
            logger.info("--overwrite: deleting %s", path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    # Only this converter creates these names; they are leftovers of a run that was killed.
    for stale in out_dir.glob(f"{EXTRACT_PREFIX}*"):
        logger.warning("deleting %s, left over by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)
    images_dir = out_dir / "images"
    if images_dir.is_dir():
        for stale in images_dir.rglob(f"*{PARTIAL_SUFFIX}"):
            stale.unlink()
    settings_path = out_dir / SETTINGS_FILE
    settings = {"num_frames": args.num_frames}
    if images_dir.is_dir() and any(images_dir.iterdir()):
        previous = json.loads(settings_path.read_text()) if settings_path.is_file() else None
        if previous != settings:
            made_with = f"with {previous}" if previous else f"by an unknown tool (no {SETTINGS_FILE})"
            raise ConversionError(
                f"{images_dir} holds frames made {made_with}, not {settings}: reusing them would mix "
                "samplings. Pass --overwrite to redo everything, or choose another --out_dir."
            )
    settings_path.write_text(json.dumps(settings) + "\n")


def _download_archive() -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=HUB_REPO_ID, filename=HUB_FILENAME, repo_type="dataset"))
    except Exception as error:
        # hf_hub_download fails in many ways offline (connection errors, offline mode, missing cache);
        # they all call for the same advice.
        raise ConversionError(
            f"could not download {HUB_FILENAME} from the hub dataset {HUB_REPO_ID} "
            f"({type(error).__name__}: {error}). Without network access pass --archive "
            f"/path/to/{HUB_FILENAME} or --video_dir /path/to/{TOP_FOLDER}."
        ) from error


def _extract(archive: Path, out_dir: Path) -> Path:
    # Imported here rather than at the top: worker processes re-import this module, and importing the
    # `common` package loads the model code (torch), seconds per worker that decoding does not need.
    from common.data.safe_archive import safe_extract_tar

    if not archive.is_file():
        raise ConversionError(f"--archive {archive} does not exist or is not a file")
    extract_dir = Path(tempfile.mkdtemp(prefix=EXTRACT_PREFIX, dir=out_dir))
    logger.info("extracting %s into %s", archive, extract_dir)
    try:
        safe_extract_tar(archive, extract_dir)
    except ValueError as error:
        shutil.rmtree(extract_dir, ignore_errors=True)
        raise ConversionError(str(error)) from error
    return extract_dir


def _results(
    jobs: list[VideoJob], images_dir: Path, num_frames: int, pool: ProcessPoolExecutor | None
) -> Iterator[str | None]:
    payloads = [(job, images_dir, num_frames) for job in jobs]
    if pool is None:
        return map(_convert_job, payloads)
    return pool.map(_convert_job, payloads, chunksize=1)


def _convert_split(
    split: str, jobs: list[VideoJob], out_dir: Path, num_frames: int, pool: ProcessPoolExecutor | None
) -> SplitSummary:
    images_dir = out_dir / "images"
    summary = SplitSummary()
    todo = [job for job in jobs if not _reusable(job, images_dir, num_frames)]
    summary.reused = len(jobs) - len(todo)
    failures: dict[VideoJob, str] = {}
    results = _results(todo, images_dir, num_frames, pool)
    for job, problem in tqdm(zip(todo, results), total=len(todo), desc=f"{split} videos", unit="video"):
        if problem is None:
            summary.converted += 1
        else:
            failures[job] = problem
            summary.skipped.append(str(job.path))
            logger.warning("skipping %s: %s", job.path, problem)
    summary.usable = [job for job in jobs if job not in failures]
    return summary


def answerable_classes(
    classes: list[str], jobs: dict[str, list[VideoJob]], summaries: dict[str, SplitSummary], root: Path
) -> list[str]:
    """The classes some video can be answered with: one of the converted splits has a usable video of it, or a
    split folder this run does not convert holds videos of it (not decoded now; kept so that each split's prompt
    is the one a conversion of every split gives). A class without either would be an answer option no video
    has; it is left out with a warning."""
    usable = {job.class_name for summary in summaries.values() for job in summary.usable}
    elsewhere = {
        class_dir.name
        for split in STANDARD_SPLITS
        if split not in summaries and (root / split).is_dir()
        for class_dir in _subfolders(root / split)
        if any(path.suffix.lower() == ".avi" for path in class_dir.iterdir())
    }
    kept = []
    for name in classes:
        if name in usable or name in elsewhere:
            kept.append(name)
            continue
        found = [str(root / split / name) for split in summaries if any(job.class_name == name for job in jobs[split])]
        logger.warning(
            "class %s has no video that decodes (%s): left out of the classes and of every prompt",
            name, "its videos in " + ", ".join(found) + " were all skipped" if found else "no video of it was found",
        )
    return kept


def _write_split(split: str, summary: SplitSummary, prompt: str, out_dir: Path, num_frames: int) -> None:
    records = [
        {
            "id": f"{split}-{job.index:010d}",
            "source": "ucf101",
            "conversations": [{"images": job.frame_names(num_frames), "user": prompt, "assistant": job.class_name}],
        }
        for job in summary.usable
    ]
    _write_jsonl(out_dir / f"ucf101_{split}.jsonl", records)


def convert(args: ConvertArguments) -> dict[str, SplitSummary]:
    """Run the conversion; raises ConversionError for problems the user has to fix."""
    if args.archive and args.video_dir:
        raise ConversionError("pass either --archive or --video_dir, not both")
    if args.num_frames < 1:
        raise ConversionError(f"--num_frames {args.num_frames}: need at least 1")
    if args.num_workers < 0:
        raise ConversionError(f"--num_workers {args.num_workers}: need 0 or more")
    if not args.splits or len(set(args.splits)) != len(args.splits):
        raise ConversionError(f"--splits {args.splits}: give each split once")
    out_dir = Path(args.out_dir)
    _prepare_out_dir(args, out_dir)
    extract_dir = None
    try:
        if args.video_dir:
            source = Path(args.video_dir)
        else:
            archive = Path(args.archive) if args.archive else _download_archive()
            source = extract_dir = _extract(archive, out_dir)
        root = locate_root(source, args.splits)
        classes, jobs = find_videos(root, args.splits)
        # spawn, not fork: the parent may hold threads (tqdm's monitor, torch pools in a test run) that a
        # forked child would inherit in an undefined state.
        pool = (
            ProcessPoolExecutor(args.num_workers, mp_context=multiprocessing.get_context("spawn"))
            if args.num_workers > 1
            else None
        )
        try:
            summaries = {split: _convert_split(split, jobs[split], out_dir, args.num_frames, pool) for split in args.splits}
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        # The prompt lists the classes only once the videos are decoded: a class whose videos all fail is no answer.
        classes = answerable_classes(classes, jobs, summaries, root)
        logger.info("%d classes: %s", len(classes), ", ".join(classes))
        prompt = build_prompt(classes)
        for split, summary in summaries.items():
            _write_split(split, summary, prompt, out_dir, args.num_frames)
        return summaries
    finally:
        if extract_dir is not None:
            shutil.rmtree(extract_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(ConvertArguments).parse_args_into_dataclasses(args=argv)
    try:
        with logging_redirect_tqdm():
            summaries = convert(args)
    except ConversionError as error:
        logger.error("%s", error)
        return 1
    done = 0
    for split, summary in summaries.items():
        done += summary.converted + summary.reused
        print(
            f"{split}: {summary.converted + summary.reused} videos converted "
            f"({summary.reused} reused from an earlier run), {len(summary.skipped)} skipped"
        )
    out_dir = Path(args.out_dir)
    print(f"frames in {out_dir / 'images'}; JSONL: " + ", ".join(str(out_dir / f"ucf101_{s}.jsonl") for s in summaries))
    if done == 0:
        logger.error("no video could be converted; see the warnings above")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
