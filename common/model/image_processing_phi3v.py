"""Phi-3.5-vision image preprocessing (the "HD transform"), written to match the reference pixel for pixel.

Each image becomes a grid of at most `num_crops` 336x336 tiles plus one 336x336 global view; see
`hd_transform` for the geometry and `image_to_crops` for the tensors. The order of operations (PIL RGB
conversion first, PIL bilinear resize, white padding, then normalisation and a torch bicubic global view)
is what the published weights were trained with; changing any step changes pixels the model sees.
`to_rgb` is the one conversion of any PIL image to the model's 8-bit RGB; `upright` the one rule for EXIF
orientation (applied, as an image viewer shows the photo).
"""

import math
from typing import TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

TILE = 336
MAX_NUM_CROPS = 16
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def check_num_crops(num_crops) -> int:
    """Return `num_crops` if it is an int in 1..16, else raise ValueError."""
    if isinstance(num_crops, bool) or not isinstance(num_crops, (int, np.integer)):
        raise ValueError(f"num_crops must be an int in 1..{MAX_NUM_CROPS}, got {num_crops!r}")
    if not 1 <= num_crops <= MAX_NUM_CROPS:
        raise ValueError(
            f"num_crops must be in 1..{MAX_NUM_CROPS} (the reference recipe refuses more than {MAX_NUM_CROPS} "
            f"tiles), got {num_crops}; use 16 for single images or 4 for multi-frame inputs"
        )
    return int(num_crops)


def num_image_tokens(height: int, width: int, tokens_per_tile: int = 144) -> int:
    """Number of placeholder tokens for one image of `height` x `width` pixels after `hd_transform`.

    Each tile row of the sub-image grid and of the global view ends with one separator ("newline") vector,
    and one more separator sits between the grid and the global view.
    """
    if height <= 0 or width <= 0 or height % TILE or width % TILE:
        raise ValueError(
            f"image size must be positive multiples of {TILE} (an hd_transform output), got {height}x{width}"
        )
    per_row = math.isqrt(tokens_per_tile)
    if per_row * per_row != tokens_per_tile:
        raise ValueError(f"tokens_per_tile must be a square number (a square grid per tile), got {tokens_per_tile}")
    h, w = height // TILE, width // TILE
    return (h * w + 1) * tokens_per_tile + 1 + (h + 1) * per_row


# Modes PIL converts to RGB by itself. Their samples are 8-bit, and PIL's plain convert("RGB") (transparency
# dropped, not composited) is what the published weights were trained with (spec section 3), so these stay
# exactly that. The others hold wider values that PIL would clip to 0..255 instead of scaling.
_PIL_RGB_MODES = frozenset({"1", "L", "P", "PA", "LA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
RGB_CONVERTIBLE_MODES = _PIL_RGB_MODES | _UINT16_MODES | {"La", "I", "F"}


def check_rgb_convertible(mode: str) -> None:
    """Raise ValueError unless `to_rgb` converts images of this PIL mode; needs only the mode, not the pixels."""
    if mode not in RGB_CONVERTIBLE_MODES:
        raise ValueError(
            f"cannot convert an image of PIL mode {mode!r} to RGB (convertible modes: "
            f"{', '.join(sorted(RGB_CONVERTIBLE_MODES))}); save the image as 8-bit RGB or grayscale, or convert it "
            "to RGB yourself before it reaches the processor"
        )


# EXIF orientations that swap width and height (the 90 and 270 degree ones, plain or mirrored).
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation tag, 1 (upright) when it has none."""
    # A PNG's getexif decodes the pixels unless its EXIF chunk precedes them, which header-only token counting
    # must not; EXIF after the pixel data is rare enough to take such a PNG as upright, here and when decoding.
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return image.getexif().get(Image.ExifTags.Base.Orientation, 1)


def upright(image: Image.Image) -> Image.Image:
    """The image as an image viewer shows it: its EXIF orientation applied. The result carries no orientation
    tag, so an image already turned upright (as `datasets` decodes hub images) is returned unchanged."""
    return image if exif_orientation(image) == 1 else ImageOps.exif_transpose(image)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of `upright(image)`, from the header alone."""
    width, height = image.size
    return (height, width) if exif_orientation(image) in TRANSPOSING_ORIENTATIONS else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """A new, decoded 8-bit RGB copy of any PIL image; transparency is dropped, never composited.

    8-bit modes go through PIL's own ``convert("RGB")``, bit for bit. "La" (premultiplied alpha, which PIL cannot
    convert to RGB) is un-premultiplied first. Single-channel images with wider samples are scaled to 0..255
    (see `_scale_to_uint8`) and repeated into the three channels, as PIL does for "L". Any other mode raises
    ValueError naming it.
    """
    check_rgb_convertible(image.mode)
    if image.mode in _PIL_RGB_MODES:
        return image.convert("RGB")
    if image.mode == "La":
        return image.convert("LA").convert("RGB")
    return Image.fromarray(_scale_to_uint8(np.asarray(image), image.mode), "L").convert("RGB")


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Wide single-channel samples mapped to 0..255, rounded half up.

    - "I;16*": unsigned 16-bit, so 65535 is white: v * 255 / 65535 (the inverse of the usual v * 257 widening).
    - "I" (signed 32-bit) carries no bit depth of its own. Pillow decodes 16-bit files into it (16-bit PGM/PPM,
      some TIFFs, 16-bit PNGs in older Pillow), so values within 0..65535 are read as 16-bit, like "I;16".
      Reading them by their maximum instead would give each file of a 16-bit data set its own white level.
      Values outside that range come from a genuinely 32-bit or signed image, which has no standard white
      level: such an image is stretched from its own minimum (black) to its maximum (white).
    - "F" (32-bit float): values within 0.0..1.0 are read as the usual float image range (numpy, torch,
      scikit-image, float TIFF exports), 1.0 white; else within 0..255 as Pillow's own float scale (what
      ``convert("F")`` of an 8-bit image gives); else stretched from minimum to maximum as for "I". The one
      image the first two readings confuse is a 0..255 one whose values all lie within 0..1, nearly black
      either way, which comes out bright.
      NaN or infinite values raise ValueError: there is no pixel value to give them.
    """
    if mode in _UINT16_MODES:
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"the {mode!r} image holds NaN or infinite values, which have no pixel value; replace them")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "I" and 0 <= low and high <= 65535:
        white = 65535.0
    elif mode == "F" and 0 <= low and high <= 1:
        white = 1.0
    elif mode == "F" and 0 <= low and high <= 255:
        white = 255.0
    else:
        # A constant image has no range to stretch; it becomes black rather than dividing by zero.
        values, white = values - low, (high - low) or 1.0
    return np.clip(np.floor(values * (255 / white) + 0.5), 0, 255).astype(np.uint8)


def best_scale(ratio: float, num_crops: int) -> int:
    """Largest s with s * ceil(s / ratio) <= num_crops: s tiles across, as many rows as the aspect needs."""
    scale = 1
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= num_crops:
        scale += 1
    return scale


def _resize_landscape(image: Image.Image, num_crops: int) -> tuple[Image.Image, bool]:
    """Steps 1-3 of the HD transform: `image` in RGB, long side horizontal, resized to `scale` tiles across.

    Returns the resized image, still transposed if the input was portrait, and whether it is.
    """
    check_num_crops(num_crops)
    # convert("RGB") of an RGB image is only a copy, and the transpose or resize below makes a new image anyway.
    if image.mode != "RGB":
        image = to_rgb(image)
    # Work with the long side horizontal so one code path covers both orientations. This transpose stays even
    # though it costs time: PIL's resize rounds to 8 bits between its horizontal and vertical pass and picks
    # their order from the sizes, so resizing a portrait image untransposed gives other pixels at some sizes.
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    width, height = image.size
    ratio = width / height
    scale = best_scale(ratio, num_crops)
    new_w = scale * TILE
    # The reference computes int(new_w / ratio); at extreme aspect ratios that is 0, which PIL cannot
    # resize to, so one row is kept instead.
    new_h = max(1, int(new_w / ratio))
    return image.resize((new_w, new_h), resample=Image.Resampling.BILINEAR), transposed


def _padded_height(height: int) -> tuple[int, int]:
    """Step 4: the height padded to whole tiles, and the white rows above the image (the rest go below)."""
    padded = math.ceil(height / TILE) * TILE
    return padded, int((padded - height) / 2)


def hd_transform(image: Image.Image, num_crops: int) -> Image.Image:
    """Resize and pad one image to H x W (multiples of 336) holding at most `num_crops` tiles.

    Returns an RGB PIL image. The conversion is `to_rgb`, which drops transparency: compositing on white (as
    transformers' `convert_to_rgb` does) would give pixels the model never saw.
    """
    resized, transposed = _resize_landscape(image, num_crops)
    new_w, new_h = resized.size
    padded_h, top = _padded_height(new_h)
    canvas = Image.new("RGB", (new_w, padded_h), (255, 255, 255))
    canvas.paste(resized, (0, top))
    if transposed:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
    return canvas


def image_to_crops(
    image: Image.Image,
    num_crops: int,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """HD-transform one image and cut it into model inputs.

    Returns `(crops, (H, W))`: `crops` is float32 (num_crops + 1, 3, 336, 336) holding the global view, the
    row-major tiles, then all-zero tiles up to num_crops + 1 entries; (H, W) is the size after `hd_transform`.
    """
    crops = torch.empty(num_crops + 1, 3, TILE, TILE, dtype=torch.float32)
    return crops, write_crops(image, crops, image_mean, image_std)


def write_crops(image: Image.Image, crops: torch.Tensor, image_mean=CLIP_MEAN, image_std=CLIP_STD) -> tuple[int, int]:
    """`image_to_crops` into `crops`, a float32 (num_crops + 1, 3, 336, 336) tensor; returns (H, W).

    The same pixels as normalising `hd_transform`'s output, with fewer copies: the channels are split by PIL
    into 8-bit planes that already hold the white padding, and the normalisation runs in place on contiguous
    float32 planes (converting interleaved or transposed 8-bit pixels to float32 is slower than PIL's split).
    """
    resized, transposed = _resize_landscape(image, crops.shape[0] - 1)
    new_w, new_h = resized.size
    padded_h, top = _padded_height(new_h)
    if transposed:
        resized = resized.transpose(Image.Transpose.TRANSPOSE)
        planes = np.full((3, new_w, padded_h), 255, dtype=np.uint8)
        image_part = planes[:, :, top : top + new_h]
    else:
        planes = np.full((3, padded_h, new_w), 255, dtype=np.uint8)
        image_part = planes[:, top : top + new_h]
    for plane, band in zip(image_part, resized.split()):
        plane[...] = np.asarray(band)
    _, height, width = planes.shape

    # The spec's ToTensor and Normalize, operation for operation in float32: x / 255, - mean, / std.
    pixels = torch.from_numpy(planes).to(torch.float32).div_(255)
    pixels.sub_(torch.as_tensor(image_mean, dtype=torch.float32).view(3, 1, 1))
    pixels.div_(torch.as_tensor(image_std, dtype=torch.float32).view(3, 1, 1))

    crops[0] = F.interpolate(pixels[None], size=(TILE, TILE), mode="bicubic", align_corners=False)[0]
    rows, cols = height // TILE, width // TILE
    tiles = crops[1 : 1 + rows * cols].view(rows, cols, 3, TILE, TILE)
    tiles.copy_(pixels.view(3, rows, TILE, cols, TILE).permute(1, 3, 0, 2, 4))
    crops[1 + rows * cols :].zero_()
    return height, width


class Phi3VImageProcessorKwargs(TypedDict, total=False):
    num_crops: int
    num_img_tokens: int
    image_mean: list[float]
    image_std: list[float]
    do_convert_rgb: bool


class Phi3VImageProcessor(BaseImageProcessor):
    """Reads and writes the checkpoint's `preprocessor_config.json`; calling it runs the HD transform.

    `num_crops` (1..16) can be set at construction, as a `from_pretrained` keyword, or per call. The file's
    `auto_map` (a pointer to remote code) is dropped on load and never written back.
    """

    model_input_names = ["pixel_values", "image_sizes"]
    # from_pretrained applies a keyword override only when its name is listed here.
    valid_kwargs = Phi3VImageProcessorKwargs

    def __init__(
        self,
        num_crops: int = 4,
        num_img_tokens: int = 144,
        image_mean: list[float] = CLIP_MEAN,
        image_std: list[float] = CLIP_STD,
        do_convert_rgb: bool = True,
        **kwargs,
    ):
        kwargs.pop("auto_map", None)
        # Recomputed from the class name by to_dict, so never stored as an attribute.
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        self.num_crops = check_num_crops(num_crops)
        self.num_img_tokens = int(num_img_tokens)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values (RGB), got {image_mean} and {image_std}")
        # Kept for a faithful round trip of the checkpoint's file; conversion to RGB always happens because
        # the white padding and the 3-channel normalisation need RGB.
        self.do_convert_rgb = bool(do_convert_rgb)

    def __call__(self, images, num_crops: int | None = None, return_tensors: str | None = "pt") -> BatchFeature:
        """Preprocess a PIL image or a list of them.

        Returns a BatchFeature with `pixel_values` float32 (N, num_crops + 1, 3, 336, 336), `image_sizes`
        int64 (N, 2) as [H, W] after the HD transform, and `num_img_tokens` (list of N ints): the length of
        each image's placeholder run in the token sequence.
        """
        return self.preprocess(images, num_crops=num_crops, return_tensors=return_tensors)

    def preprocess(self, images, num_crops: int | None = None, return_tensors: str | None = "pt") -> BatchFeature:
        if return_tensors not in ("pt", None):
            raise ValueError(f"only torch tensors are returned; pass return_tensors='pt', not {return_tensors!r}")
        num_crops = self.num_crops if num_crops is None else check_num_crops(num_crops)
        if isinstance(images, Image.Image):
            images = [images]
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError(
                f"images must be a PIL image or a non-empty list of PIL images, got {type(images).__name__}"
            )
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"images[{i}] is a {type(image).__name__}; Phi3VImageProcessor takes PIL images")

        # Written in place: stacking per-image tensors would copy every pixel once more.
        pixel_values = torch.empty(len(images), num_crops + 1, 3, TILE, TILE, dtype=torch.float32)
        sizes = [write_crops(im, crops, self.image_mean, self.image_std) for im, crops in zip(images, pixel_values)]
        return BatchFeature(
            {
                "pixel_values": pixel_values,
                "image_sizes": torch.tensor(sizes, dtype=torch.int64),
                "num_img_tokens": [num_image_tokens(h, w, self.num_img_tokens) for h, w in sizes],
            }
        )

    def to_dict(self):
        output = super().to_dict()
        output["processor_class"] = "Phi3VProcessor"
        return output
