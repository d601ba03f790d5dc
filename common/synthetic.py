"""Small synthetic stand-ins for the recipe's datasets, in their real schemas (spec section 9).

They let every script and test run offline and fast: the columns and feature types are exactly those
of the hub datasets, and the answers are learnable from the pixels, so a short training run can show
a real improvement.

    python -m common.synthetic docvqa --out /tmp/syn_docvqa --n 24 --seed 0
    python -m common.synthetic hateful_memes --out /tmp/syn_memes --n 600
    python -m common.synthetic nlvr2 --out /tmp/syn_nlvr2
    python -m common.synthetic ucf101_videos --out /tmp/syn_ucf --classes 3 --videos_per_class 2

The first three write a `datasets.DatasetDict` with `save_to_disk(OUT)` (read it back with
`datasets.load_from_disk`). `ucf101_videos` writes `OUT/UCF101_subset/{train,val,test}/{Class}/*.avi`
and `OUT/UCF101_subset.tar.gz`, the layout of `sayakpaul/ucf101-subset`. Every video frame carries its
own frame index as a strip of black/white blocks; `decode_frame_index` reads it back, so tests can
check which frames a converter sampled.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont
from tqdm import tqdm

DOCVQA_FEATURES = Features(
    {
        "id": Value("string"),
        "image": Image(),
        "query": {lang: Value("string") for lang in ("de", "en", "es", "fr", "it")},
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

CAULDRON_FEATURES = Features(
    {
        "images": List(Image()),
        "texts": List(
            {"user": Value("string"), "assistant": Value("string"), "source": Value("string")}
        ),
    }
)

UCF101_CLASSES = (
    "ApplyEyeMakeup",
    "ApplyLipstick",
    "Archery",
    "BabyCrawling",
    "BalanceBeam",
    "BandMarching",
    "BaseballPitch",
    "Basketball",
    "BasketballDunk",
    "BenchPress",
)
UCF101_SPLITS = ("train", "val", "test")
UCF101_TOP_FOLDER = "UCF101_subset"

# Bits of the frame-index strip: 8 bits cover 255 frames, far more than the short synthetic clips need,
# while keeping each block wide enough to survive mpeg4 and JPEG compression.
INDEX_BITS = 8
MAX_FRAMES = 2**INDEX_BITS - 1

KINDS = ("docvqa", "hateful_memes", "nlvr2", "ucf101_videos", "custom_llava")

_CLASS_COLOURS = (
    (220, 40, 40),
    (40, 170, 60),
    (40, 70, 210),
    (230, 210, 40),
    (200, 50, 200),
    (40, 200, 210),
    (240, 130, 20),
    (120, 50, 170),
    (130, 80, 40),
    (20, 120, 120),
)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


# ----------------------------------------------------------------------------------------------
# DocVQA
# ----------------------------------------------------------------------------------------------

# One question per document field, in the five languages of the real `query` struct.
_DOC_QUESTIONS = {
    "invoice": {
        "de": "Wie lautet die Rechnungsnummer?",
        "en": "What is the invoice number?",
        "es": "¿Cuál es el número de factura?",
        "fr": "Quel est le numéro de facture ?",
        "it": "Qual è il numero della fattura?",
    },
    "date": {
        "de": "Welches Datum trägt das Dokument?",
        "en": "What is the date of the document?",
        "es": "¿Cuál es la fecha del documento?",
        "fr": "Quelle est la date du document ?",
        "it": "Qual è la data del documento?",
    },
    "total": {
        "de": "Wie hoch ist der Gesamtbetrag?",
        "en": "What is the total amount?",
        "es": "¿Cuál es el importe total?",
        "fr": "Quel est le montant total ?",
        "it": "Qual è l'importo totale?",
    },
    "company": {
        "de": "Wie heißt das Unternehmen?",
        "en": "What is the name of the company?",
        "es": "¿Cómo se llama la empresa?",
        "fr": "Quel est le nom de l'entreprise ?",
        "it": "Come si chiama l'azienda?",
    },
}
_COMPANY_WORDS = ("Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Vandelay")
_COMPANY_SUFFIXES = ("Corp", "Ltd", "Inc", "GmbH")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
# Width x height choices: wide, tall and square pages, small enough to keep tests fast.
_DOC_SIZES = ((640, 260), (700, 320), (260, 600), (320, 700), (420, 420), (500, 360), (240, 480))


def _document_fields(rng: random.Random) -> dict[str, tuple[str, list[str]]]:
    """Field -> (text drawn on the page, accepted answers); the first answer is the drawn text."""
    number = rng.randint(10000, 99999)
    day, month, year = rng.randint(1, 28), rng.randint(1, 12), rng.randint(1995, 2023)
    amount = rng.randint(100, 999999) / 100
    company = f"{rng.choice(_COMPANY_WORDS)} {rng.choice(_COMPANY_SUFFIXES)}"
    date_text = f"{day:02d}/{month:02d}/{year}"
    total_text = f"${amount:,.2f}"
    return {
        "invoice": (f"INV-{number}", [f"INV-{number}", str(number)][: rng.randint(1, 2)]),
        "date": (date_text, [date_text, f"{day} {_MONTHS[month - 1]} {year}"][: rng.randint(1, 2)]),
        "total": (total_text, [total_text, f"{amount:,.2f}", f"{amount:.2f}"][: rng.randint(1, 3)]),
        "company": (company, [company, company.upper()][: rng.randint(1, 2)]),
    }


def _docvqa_example(rng: random.Random, example_id: str) -> dict:
    width, height = rng.choice(_DOC_SIZES)
    # Capped by the page width so that the longest line (the invoice number) is never clipped.
    font_size = min(rng.randint(12, 22), width // 14)
    font = _font(font_size)
    title_font = _font(font_size + 6)
    page = PILImage.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    fields = _document_fields(rng)
    lines = [
        ("company", fields["company"][0], title_font),
        ("invoice", f"Invoice No: {fields['invoice'][0]}", font),
        ("date", f"Date: {fields['date'][0]}", font),
        ("total", f"Total: {fields['total'][0]}", font),
    ]
    words: list[str] = []
    boxes: list[list[float]] = []
    value_start: dict[str, int] = {}
    x_margin = rng.randint(8, 24)
    y = rng.randint(8, 24)
    for key, line, line_font in lines:
        value = fields[key][0]
        x = float(x_margin)
        line_words = line.split(" ")
        first_value_word = len(line_words) - len(value.split(" "))
        for position, word in enumerate(line_words):
            if position == first_value_word:
                value_start[key] = len(words)
            draw.text((x, y), word, fill=(0, 0, 0), font=line_font)
            x0, y0, x1, y1 = draw.textbbox((x, y), word, font=line_font)
            words.append(word)
            boxes.append([float(x0), float(y0), float(x1), float(y1)])
            x += draw.textlength(word + " ", font=line_font)
        y += int(line_font.size * 1.8)
    # The real pages hold much more text than the asked value: add filler so the model has to find it.
    filler = ("Payment", "due", "within", "30", "days", "of", "receipt", "thank", "you")
    while y + font_size < height - 8:
        x = float(x_margin)
        for _ in range(rng.randint(2, 6)):
            word = rng.choice(filler)
            if x + draw.textlength(word, font=font) > width - x_margin:
                break
            draw.text((x, y), word, fill=(90, 90, 90), font=font)
            x0, y0, x1, y1 = draw.textbbox((x, y), word, font=font)
            words.append(word)
            boxes.append([float(x0), float(y0), float(x1), float(y1)])
            x += draw.textlength(word + " ", font=font)
        y += int(font_size * 1.6)
    key = rng.choice(sorted(_DOC_QUESTIONS))
    drawn, answers = fields[key]
    return {
        "id": example_id,
        "image": page,
        "query": dict(_DOC_QUESTIONS[key]),
        "answers": answers,
        "words": words,
        "bounding_boxes": boxes,
        # The real column holds another model's prediction; a plausible one keeps the types honest.
        "answer": {
            "match_score": 1.0,
            "matched_text": drawn,
            "start": value_start[key],
            "text": drawn,
        },
    }


def make_docvqa(n: int = 24, seed: int = 0) -> DatasetDict:
    """`nielsr/docvqa_1200_examples` look-alike: train of n rows, test of max(4, n // 5) rows."""
    rng = random.Random(f"docvqa-{seed}")
    splits = {}
    for split, size in (("train", n), ("test", max(4, n // 5))):
        rows = [_docvqa_example(rng, f"{split}_{i}") for i in tqdm(range(size), desc=f"docvqa {split}")]
        splits[split] = Dataset.from_list(rows, features=DOCVQA_FEATURES)
    return DatasetDict(splits)


# ----------------------------------------------------------------------------------------------
# the_cauldron: hateful_memes and nlvr2
# ----------------------------------------------------------------------------------------------

_MEME_CAPTIONS = ("when the weekend finally arrives", "me explaining my code", "monday again",
                  "that feeling when it compiles", "nobody:", "my cat at 3am", "the group chat")


def _meme_example(rng: random.Random) -> dict:
    # The learnable rule: a red-framed meme is "hateful", a green-framed one is not.
    hateful = rng.random() < 0.5
    width, height = rng.choice(((224, 160), (160, 224), (192, 192), (256, 144)))
    frame_colour = (200, 30, 30) if hateful else (30, 160, 60)
    image = PILImage.new("RGB", (width, height), frame_colour)
    draw = ImageDraw.Draw(image)
    border = max(8, min(width, height) // 10)
    inner = tuple(rng.randint(150, 255) for _ in range(3))
    draw.rectangle((border, border, width - border - 1, height - border - 1), fill=inner)
    caption = rng.choice(_MEME_CAPTIONS)
    draw.text((border + 4, border + 4), caption, fill=(0, 0, 0), font=_font(12))
    return {
        "images": [image],
        "texts": [
            {
                "user": "Is this meme hateful? Answer yes or no.",
                "assistant": "yes" if hateful else "no",
                "source": "hateful_memes",
            }
        ],
    }


def _shapes_image(rng: random.Random, count: int) -> PILImage.Image:
    """A panel with `count` non-overlapping shapes, one per cell of a 2x2 grid."""
    size = 128
    image = PILImage.new("RGB", (size, size), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    cell = size // 2
    for slot in rng.sample(range(4), count):
        x0 = (slot % 2) * cell + rng.randint(6, 14)
        y0 = (slot // 2) * cell + rng.randint(6, 14)
        extent = rng.randint(30, 44)
        box = (x0, y0, x0 + extent, y0 + extent)
        colour = tuple(rng.randint(0, 140) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
    return image


def _nlvr2_statements(rng: random.Random, left: int, right: int) -> list[tuple[str, bool]]:
    # A wrong count is drawn half of the time so that True and False stay balanced.
    def claimed(actual: int, low: int, high: int) -> int:
        if rng.random() < 0.5:
            return actual
        return rng.choice([k for k in range(low, high + 1) if k != actual])

    k_left, k_right, k_total = claimed(left, 1, 4), claimed(right, 1, 4), claimed(left + right, 2, 8)
    return [
        (f"The left image contains exactly {k_left} shapes.", k_left == left),
        (f"The right image contains exactly {k_right} shapes.", k_right == right),
        ("The right image contains more shapes than the left image.", right > left),
        ("Both images contain the same number of shapes.", left == right),
        (f"There are {k_total} shapes in the two images together.", k_total == left + right),
    ]


def _nlvr2_example(rng: random.Random) -> dict:
    left, right = rng.randint(1, 4), rng.randint(1, 4)
    statements = rng.sample(_nlvr2_statements(rng, left, right), rng.randint(2, 4))
    return {
        "images": [_shapes_image(rng, left), _shapes_image(rng, right)],
        "texts": [
            {
                "user": f"{statement}\nIs this statement true or false?",
                "assistant": "True" if truth else "False",
                "source": "nlvr2",
            }
            for statement, truth in statements
        ],
    }


def _cauldron(kind: str, n: int, seed: int) -> DatasetDict:
    make_row = {"hateful_memes": _meme_example, "nlvr2": _nlvr2_example}[kind]
    rng = random.Random(f"{kind}-{seed}")
    rows = [make_row(rng) for _ in tqdm(range(n), desc=kind)]
    return DatasetDict({"train": Dataset.from_list(rows, features=CAULDRON_FEATURES)})


def make_hateful_memes(n: int = 24, seed: int = 0) -> DatasetDict:
    """the_cauldron `hateful_memes` look-alike (train split only); red frame means "yes"."""
    return _cauldron("hateful_memes", n, seed)


def make_nlvr2(n: int = 24, seed: int = 0) -> DatasetDict:
    """the_cauldron `nlvr2` look-alike (train split only): two shape panels, true/false statements."""
    return _cauldron("nlvr2", n, seed)


def llava_rows(image_dir: Path, n: int = 24, seed: int = 0) -> list[dict]:
    """Rows in the LLaVA conversation format over shape panels written to `image_dir` as PNGs (paths relative to
    it): one panel ("How many shapes?"), two panels (a second turn asks about the other) and text-only rows,
    in turn, with `<image>` placeholders in some rows and none in others. Counts cycle, so no answer dominates."""
    rng = random.Random(f"custom-llava-{seed}")
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n):
        counts = [index % 4 + 1, (index + 1) % 4 + 1][: (index % 3 == 1) + 1] if index % 3 != 2 else []
        names = []
        for k, count in enumerate(counts):
            names.append(f"{index:04d}-{k}.png")
            _shapes_image(rng, count).save(image_dir / names[-1])
        if not counts:
            a, b = index % 5 + 1, index % 3 + 2
            turns = [("human", f"What is {a} plus {b}?"), ("gpt", str(a + b))]
        elif len(counts) == 1:
            question = "<image>\nHow many shapes are there?" if index % 2 else "How many shapes are there?"
            turns = [("human", question), ("gpt", str(counts[0]))]
        else:
            turns = [("human", "Left: <image> Right: <image>\nHow many shapes are on the left?"), ("gpt", str(counts[0])),
                     ("human", "And on the right?"), ("gpt", str(counts[1]))]
        row = {"id": f"row-{index:04d}", "conversations": [{"from": who, "value": text} for who, text in turns]}
        if names:
            row["image"] = names[0] if len(names) == 1 else names
        rows.append(row)
    return rows


def write_custom_llava(out: Path, n: int = 24, seed: int = 0) -> Path:
    """`out/train.json` (a JSON array of `llava_rows`) with its images in `out`; returns the file."""
    rows = llava_rows(out, n, seed)
    path = out / "train.json"
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# UCF-101 videos
# ----------------------------------------------------------------------------------------------

def _strip_top(height: int) -> int:
    """First row of the frame-index strip: the bottom third of the frame."""
    return height - height // 3


def encode_frame_index(frame: np.ndarray, index: int) -> None:
    """Draw `index` into the bottom third of an (H, W, 3) uint8 frame, in place.

    The strip is INDEX_BITS equal blocks across the full width, most significant bit on the left,
    white for 1 and black for 0.
    """
    if not 0 <= index <= MAX_FRAMES:
        raise ValueError(f"frame index {index} does not fit in {INDEX_BITS} bits (0..{MAX_FRAMES})")
    height, width = frame.shape[:2]
    top = _strip_top(height)
    edges = np.linspace(0, width, INDEX_BITS + 1).round().astype(int)
    for bit in range(INDEX_BITS):
        on = (index >> (INDEX_BITS - 1 - bit)) & 1
        frame[top:, edges[bit] : edges[bit + 1]] = 255 if on else 0


def decode_frame_index(image: PILImage.Image) -> int:
    """Read back the index written by `encode_frame_index`, from a decoded (lossy) frame of any size."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    height, width = grey.shape
    top = _strip_top(height)
    edges = np.linspace(0, width, INDEX_BITS + 1)
    value = 0
    for bit in range(INDEX_BITS):
        # Only the middle of each block is read: compression smears the block edges.
        left, right = edges[bit], edges[bit + 1]
        margin_x = (right - left) / 4
        margin_y = (height - top) / 4
        block = grey[
            int(top + margin_y) : int(height - margin_y) or None,
            int(left + margin_x) : int(right - margin_x),
        ]
        value = (value << 1) | int(block.mean() > 127.5)
    return value


def make_video_frame(
    class_index: int, frame_index: int, width: int = 80, height: int = 60, jitter: int = 0
) -> np.ndarray:
    """One RGB frame: the class colour with a white square at a class-specific place, plus the index strip.

    Colour and square position both identify the class in every frame; `jitter` (a few pixels, chosen
    per video) and a small per-frame sway keep frames of one class from being identical.
    """
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    top = _strip_top(height)
    frame[:top] = _CLASS_COLOURS[class_index % len(_CLASS_COLOURS)]
    side = max(4, top // 3)
    columns = 5
    slot_w = (width - side) / (columns - 1)
    x0 = int(round((class_index % columns) * slot_w)) + jitter + (frame_index % 3) - 1
    y0 = 1 if (class_index // columns) % 2 == 0 else top - side - 1
    x0 = min(max(x0, 0), width - side)
    frame[y0 : y0 + side, x0 : x0 + side] = 255
    encode_frame_index(frame, frame_index)
    return frame


def write_avi(path: str | Path, frames: Iterable[np.ndarray], fps: int = 25) -> None:
    """Encode (H, W, 3) uint8 RGB frames to an MPEG-4 part 2 .avi, the codec family of UCF-101's XviD."""
    frames = iter(frames)
    first = next(frames)
    height, width = first.shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        # A generous bit rate keeps the tiny frames close to lossless, so the index strip survives.
        stream.bit_rate = 2_000_000
        stream.codec_context.thread_count = 1
        for array in (first, *frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@dataclass
class SyntheticVideos:
    """What `write_ucf101_videos` wrote; `frame_counts` maps paths relative to `root` to frame counts."""

    root: Path
    archive: Path
    classes: list[str]
    frame_counts: dict[str, int] = field(default_factory=dict)


def _deterministic_tar_gz(source: Path, archive: Path) -> None:
    """Tar `source` (as its own top folder) into `archive`, byte-identical for identical trees."""

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with open(archive, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(source, arcname=source.name, filter=normalise)


def write_ucf101_videos(
    out_dir: str | Path,
    classes: int | Sequence[str] = len(UCF101_CLASSES),
    videos_per_class: int = 2,
    seed: int = 0,
    min_frames: int = 12,
    max_frames: int = 40,
    width: int = 80,
    height: int = 60,
    fps: int = 25,
) -> SyntheticVideos:
    """Write `out_dir/UCF101_subset/{train,val,test}/{Class}/v_{Class}_gXX_cYY.avi` and its .tar.gz.

    `classes` is a count (the first K real class names) or explicit names. Frame counts are drawn
    uniformly from [min_frames, max_frames] per video.
    """
    if isinstance(classes, int):
        if not 1 <= classes <= len(UCF101_CLASSES):
            raise ValueError(f"classes={classes}: choose between 1 and {len(UCF101_CLASSES)} classes")
        class_names = list(UCF101_CLASSES[:classes])
    else:
        class_names = list(classes)
    if not 1 <= min_frames <= max_frames <= MAX_FRAMES:
        raise ValueError(
            f"min_frames={min_frames}, max_frames={max_frames}: need 1 <= min_frames <= max_frames"
            f" <= {MAX_FRAMES} (the frame-index strip holds {INDEX_BITS} bits)"
        )
    if videos_per_class < 1:
        raise ValueError(f"videos_per_class={videos_per_class}: need at least 1")
    if width % 2 or height % 2:
        raise ValueError(f"{width}x{height}: MPEG-4 needs even frame sizes")
    out_dir = Path(out_dir)
    root = out_dir / UCF101_TOP_FOLDER
    archive = out_dir / f"{UCF101_TOP_FOLDER}.tar.gz"
    for existing in (root, archive):
        if existing.exists():
            raise FileExistsError(f"{existing} already exists: delete it or choose another --out")
    rng = random.Random(f"ucf101-{seed}")
    result = SyntheticVideos(root=root, archive=archive, classes=class_names)
    jobs = [
        (split, class_index, name, video)
        for class_index, name in enumerate(class_names)
        for split in UCF101_SPLITS
        for video in range(videos_per_class)
    ]
    for split, class_index, name, video in tqdm(jobs, desc="ucf101 videos"):
        ordinal = UCF101_SPLITS.index(split) * videos_per_class + video
        # Real UCF-101 names a clip by group (gXX, one actor/scene) and clip within the group (cYY).
        stem = f"v_{name}_g{ordinal // 4 + 1:02d}_c{ordinal % 4 + 1:02d}"
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        count = rng.randint(min_frames, max_frames)
        jitter = rng.randint(-2, 2)
        write_avi(
            folder / f"{stem}.avi",
            (make_video_frame(class_index, i, width, height, jitter) for i in range(count)),
            fps=fps,
        )
        result.frame_counts[f"{split}/{name}/{stem}.avi"] = count
    _deterministic_tar_gz(root, archive)
    return result


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

DATASET_MAKERS = {"docvqa": make_docvqa, "hateful_memes": make_hateful_memes, "nlvr2": make_nlvr2}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m common.synthetic",
        description="Write small synthetic data in the real schemas of the recipe's datasets.",
    )
    parser.add_argument("kind", choices=KINDS, help="which dataset to imitate")
    parser.add_argument("--out", type=Path, required=True, help="output directory (must not hold data)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same data")
    parser.add_argument(
        "--n", type=int, default=None,
        help="rows: docvqa train split (test gets max(4, n // 5)), hateful_memes/nlvr2/custom_llava train (default 24)",
    )
    parser.add_argument("--classes", type=int, default=None,
                        help=f"ucf101_videos: use the first K real class names (default {len(UCF101_CLASSES)})")
    parser.add_argument("--videos_per_class", type=int, default=None,
                        help="ucf101_videos: videos per class in each split (default 2)")
    parser.add_argument("--min_frames", type=int, default=None, help="ucf101_videos: shortest video (default 12)")
    parser.add_argument("--max_frames", type=int, default=None, help="ucf101_videos: longest video (default 40)")
    args = parser.parse_args(argv)
    video_options = ("classes", "videos_per_class", "min_frames", "max_frames")
    if args.kind == "ucf101_videos":
        if args.n is not None:
            parser.error("--n does not apply to ucf101_videos: use --classes and --videos_per_class")
    else:
        given = [f"--{name}" for name in video_options if getattr(args, name) is not None]
        if given:
            parser.error(f"{', '.join(given)} only apply to ucf101_videos, not {args.kind}")
        if args.n is not None and args.n < 1:
            parser.error(f"--n {args.n}: need at least 1 row")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.kind == "ucf101_videos":
        try:
            written = write_ucf101_videos(
            args.out,
                classes=args.classes if args.classes is not None else len(UCF101_CLASSES),
                videos_per_class=args.videos_per_class if args.videos_per_class is not None else 2,
                seed=args.seed,
                min_frames=args.min_frames if args.min_frames is not None else 12,
                max_frames=args.max_frames if args.max_frames is not None else 40,
            )
        except (FileExistsError, ValueError) as error:
            raise SystemExit(f"error: {error}") from None
        print(f"wrote {len(written.frame_counts)} videos of {len(written.classes)} classes under {written.root}")
        print(f"wrote the archive {written.archive}")
        return
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"error: {args.out} is not empty: delete it or choose another --out")
    if args.kind == "custom_llava":
        path = write_custom_llava(args.out, n=args.n if args.n is not None else 24, seed=args.seed)
        print(f"wrote a LLaVA-format file {path} and its images; train on it with finetune_hf_trainer_custom.py --train_file {path}")
        return
    dataset = DATASET_MAKERS[args.kind](n=args.n if args.n is not None else 24, seed=args.seed)
    dataset.save_to_disk(str(args.out))
    sizes = ", ".join(f"{split} {len(rows)}" for split, rows in dataset.items())
    print(f"wrote {args.kind} ({sizes} rows) to {args.out}; read it with datasets.load_from_disk")


if __name__ == "__main__":
    main()
