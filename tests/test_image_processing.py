"""Phi3VImageProcessor against spec section 3 (HD transform), exactly, on CPU."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.model.image_processing_phi3v import (
    CLIP_MEAN,
    CLIP_STD,
    TILE,
    Phi3VImageProcessor,
    hd_transform,
    image_to_crops,
    num_image_tokens,
    to_rgb,
)

OFFICIAL_PREPROCESSOR_CONFIG = {
    "auto_map": {
        "AutoImageProcessor": "microsoft/Phi-3.5-vision-instruct--processing_phi3_v.Phi3VImageProcessor",
        "AutoProcessor": "microsoft/Phi-3.5-vision-instruct--processing_phi3_v.Phi3VProcessor",
    },
    "do_convert_rgb": True,
    "image_mean": CLIP_MEAN,
    "image_processor_type": "Phi3VImageProcessor",
    "image_std": CLIP_STD,
    "num_crops": 4,
    "num_img_tokens": 144,
    "processor_class": "Phi3VProcessor",
}

MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
STD = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)


def normalized(rgb) -> torch.Tensor:
    """The normalized float32 value of one RGB colour, shape (3, 1, 1), computed as ToTensor + Normalize do."""
    return (torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255 - MEAN) / STD


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).to(torch.float32) / 255
    return (pixels - MEAN) / STD


def untile(crops: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Reassemble the row-major tiles (crops[1:]) into the normalized H x W image."""
    rows, cols = height // TILE, width // TILE
    tiles = crops[1 : 1 + rows * cols].reshape(rows, cols, 3, TILE, TILE)
    return tiles.permute(2, 0, 3, 1, 4).reshape(3, height, width)


# (width, height) -> {num_crops: (H, W)} worked out by hand from the spec's scale formula.
SIZE_TABLE = {
    (1000, 300): {1: (336, 336), 4: (336, 1008), 16: (672, 2016)},
    (300, 1000): {1: (336, 336), 4: (1008, 336), 16: (2016, 672)},
    (1344, 1344): {1: (336, 336), 4: (672, 672), 16: (1344, 1344)},
    (1, 1): {1: (336, 336), 4: (672, 672), 16: (1344, 1344)},
    (20, 10): {1: (336, 336), 4: (336, 672), 16: (1008, 1680)},
    (5000, 3000): {1: (336, 336), 4: (672, 672), 16: (1008, 1680)},
    (4000, 10): {1: (336, 336), 4: (336, 1344), 16: (336, 5376)},
}


@pytest.fixture(scope="module")
def processor():
    return Phi3VImageProcessor()


@pytest.mark.parametrize("num_crops", [1, 4, 16])
@pytest.mark.parametrize("size", list(SIZE_TABLE), ids=lambda s: f"{s[0]}x{s[1]}")
def test_size_table(processor, size, num_crops):
    width, height = size
    out = processor(Image.new("RGB", size, (10, 200, 30)), num_crops=num_crops)
    expected_h, expected_w = SIZE_TABLE[size][num_crops]
    rows, cols = expected_h // TILE, expected_w // TILE

    pixel_values = out["pixel_values"]
    assert pixel_values.dtype == torch.float32
    assert pixel_values.shape == (1, num_crops + 1, 3, TILE, TILE)
    assert out["image_sizes"].dtype == torch.int64
    assert out["image_sizes"].tolist() == [[expected_h, expected_w]]
    assert rows * cols <= num_crops
    nonzero = [bool(tile.abs().sum() > 0) for tile in pixel_values[0]]
    assert nonzero == [True] * (1 + rows * cols) + [False] * (num_crops - rows * cols)
    assert torch.count_nonzero(pixel_values[0, 1 + rows * cols :]) == 0
    assert out["num_img_tokens"] == [(rows * cols + 1) * 144 + 1 + (rows + 1) * 12]
    assert hd_transform(Image.new("RGB", size), num_crops).size == (expected_w, expected_h)


def test_token_formula():
    assert num_image_tokens(1344, 1344) == 2509
    assert num_image_tokens(336, 336) == 313
    assert num_image_tokens(672, 336) == 3 * 144 + 1 + 3 * 12
    with pytest.raises(ValueError, match="multiples of 336"):
        num_image_tokens(300, 336)


def test_square_16_crops_gives_2509_tokens(processor):
    out = processor(Image.new("RGB", (1344, 1344)), num_crops=16)
    assert out["num_img_tokens"] == [2509]


@pytest.mark.parametrize("transposed", [False, True])
def test_white_padding_split_top_and_bottom(transposed):
    # 1000x301 at 4 crops: new_w 1008, new_h int(1008 / (1000/301)) = 303, pad 33 -> top 16, bottom 17.
    size = (301, 1000) if transposed else (1000, 301)
    crops, (height, width) = image_to_crops(Image.new("RGB", size, (0, 0, 0)), 4)
    assert (height, width) == ((1008, 336) if transposed else (336, 1008))
    full = untile(crops, height, width)
    if transposed:
        full = full.transpose(1, 2)
    white, black = normalized((255, 255, 255)), normalized((0, 0, 0))
    assert torch.equal(full[:, :16], white.expand(3, 16, 1008))
    assert torch.equal(full[:, 16:319], black.expand(3, 303, 1008))
    assert torch.equal(full[:, 319:], white.expand(3, 17, 1008))


def test_resize_is_pil_bilinear_then_white_pad():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (230, 500, 3), dtype=np.uint8))
    # ratio 500/230: scale 2 (2 * ceil(2 / 2.17) = 2 <= 4, 3 * ceil(3 / 2.17) = 6 > 4).
    new_w, new_h = 672, int(672 / (500 / 230))
    expected = np.full((336, 672, 3), 255, dtype=np.uint8)
    top = int((336 - new_h) / 2)
    expected[top : top + new_h] = np.array(image.resize((new_w, new_h), Image.Resampling.BILINEAR))
    assert np.array_equal(np.array(hd_transform(image, 4)), expected)


def test_tall_image_marker_lands_in_the_right_tile():
    # 300 wide x 1000 tall at 4 crops: handled as 1000x300 transposed -> 1008x302 padded to 1008x336 (top 17),
    # transposed back to H 1008 x W 336: three tiles stacked vertically.
    array = np.full((1000, 300, 3), 128, dtype=np.uint8)
    array[900:950, 20:60] = (255, 0, 0)
    crops, (height, width) = image_to_crops(Image.fromarray(array), 4)
    assert (height, width) == (1008, 336)
    red = [(tile[0] > 1.5) & (tile[1] < -1.0) for tile in crops[1:4]]
    assert [int(mask.sum()) > 0 for mask in red] == [False, False, True]
    ys, xs = torch.nonzero(red[2], as_tuple=True)
    # Original rows 900..950 -> 907..958 of 1008 -> 235..286 in the third tile; columns 20..60 scale by
    # 302/300 and shift by the 17 padding columns -> 37..77. A rotation instead of a transpose would mirror x.
    assert abs(ys.float().mean().item() - (925 * 1008 / 1000 - 672)) < 3
    assert abs(xs.float().mean().item() - (40 * 302 / 300 + 17)) < 3


def test_global_view_is_torch_bicubic_of_normalized_padded_image():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (400, 900, 3), dtype=np.uint8))
    crops, (height, width) = image_to_crops(image, 16)
    padded = to_normalized_tensor(hd_transform(image, 16))
    assert padded.shape == (3, height, width)
    expected_global = F.interpolate(padded[None], size=(TILE, TILE), mode="bicubic", align_corners=False)[0]
    assert torch.equal(crops[0], expected_global)
    assert torch.equal(untile(crops, height, width), padded)
    # Row-major: the second tile is the top row's second column.
    assert torch.equal(crops[2], padded[:, :TILE, TILE : 2 * TILE])


def test_rgba_uses_plain_convert_not_white_compositing(processor):
    rgba = Image.new("RGBA", (336, 336), (200, 10, 10, 0))
    out = processor(rgba, num_crops=1)["pixel_values"][0]
    assert torch.equal(out[1], normalized((200, 10, 10)).expand(3, TILE, TILE))
    assert torch.equal(out, processor(rgba.convert("RGB"), num_crops=1)["pixel_values"][0])


def test_batch_of_mixed_sizes(processor):
    images = [Image.new("RGB", (1000, 300)), Image.new("L", (300, 1000)), Image.new("RGB", (1, 1))]
    out = processor(images, num_crops=4)
    assert out["pixel_values"].shape == (3, 5, 3, TILE, TILE)
    assert out["image_sizes"].tolist() == [[336, 1008], [1008, 336], [672, 672]]
    assert out["num_img_tokens"] == [num_image_tokens(h, w) for h, w in out["image_sizes"].tolist()]
    assert torch.equal(out["pixel_values"][1], processor(images[1], num_crops=4)["pixel_values"][0])


@pytest.mark.parametrize("bad", [0, 17, -1, 4.0])
def test_num_crops_out_of_range_raises(processor, bad):
    image = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="num_crops"):
        processor(image, num_crops=bad)
    with pytest.raises(ValueError, match="num_crops"):
        Phi3VImageProcessor(num_crops=bad)
    with pytest.raises(ValueError, match="num_crops"):
        hd_transform(image, bad)


def test_bad_inputs_raise(processor):
    with pytest.raises(TypeError, match=r"images\[1\]"):
        processor([Image.new("RGB", (4, 4)), np.zeros((4, 4, 3))])
    with pytest.raises(ValueError, match="non-empty"):
        processor([])


def test_official_config_round_trip(tmp_path):
    src, dst = tmp_path / "official", tmp_path / "saved"
    src.mkdir()
    (src / "preprocessor_config.json").write_text(json.dumps(OFFICIAL_PREPROCESSOR_CONFIG, indent=2))
    # The official processor_config.json carries only a class name and remote-code pointer.
    (src / "processor_config.json").write_text(
        json.dumps(
            {"auto_map": {"AutoProcessor": "x--processing_phi3_v.Phi3VProcessor"}, "processor_class": "Phi3VProcessor"}
        )
    )

    loaded = Phi3VImageProcessor.from_pretrained(src)
    assert (loaded.num_crops, loaded.num_img_tokens, loaded.do_convert_rgb) == (4, 144, True)
    assert loaded.image_mean == CLIP_MEAN and loaded.image_std == CLIP_STD
    assert not hasattr(loaded, "auto_map")

    overridden = Phi3VImageProcessor.from_pretrained(src, num_crops=16)
    assert overridden.num_crops == 16
    with pytest.raises(ValueError, match="num_crops"):
        Phi3VImageProcessor.from_pretrained(src, num_crops=17)

    overridden.save_pretrained(dst)
    saved = json.loads((dst / "preprocessor_config.json").read_text())
    assert "auto_map" not in saved
    expected = {k: v for k, v in OFFICIAL_PREPROCESSOR_CONFIG.items() if k != "auto_map"}
    assert saved == {**expected, "num_crops": 16}

    reloaded = Phi3VImageProcessor.from_pretrained(dst)
    assert reloaded.to_dict() == overridden.to_dict()
    image = Image.new("RGB", (500, 200), (1, 2, 3))
    assert torch.equal(reloaded(image)["pixel_values"], overridden(image)["pixel_values"])


# ------------------------------------------------------------------------------------------------------------
# Conversion to RGB (to_rgb): 8-bit modes exactly as PIL's convert("RGB"), wider samples scaled, not clipped


def random_gray(seed: int, shape=(48, 80)) -> np.ndarray:
    """8-bit gray noise that reaches both 0 and 255, so min..max stretching has nothing to stretch."""
    values = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    values.flat[:2] = (0, 255)
    return values


def gray_rgb(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2)


@pytest.mark.parametrize("file_format, opened_mode", [("PNG", "I;16"), ("PPM", "I")])
def test_16_bit_scan_gives_the_pixels_of_its_8_bit_version(processor, tmp_path, file_format, opened_mode):
    # A 16-bit scan whose high byte is the 8-bit version, with unrelated low bytes, as a scanner writes it.
    eight = random_gray(0, (300, 500))
    low_bytes = np.random.default_rng(1).integers(0, 256, eight.shape)
    sixteen = (eight.astype(np.int64) * 256 + low_bytes).astype(np.uint16)
    path = tmp_path / f"scan.{file_format.lower()}"
    Image.fromarray(sixteen).save(path, format=file_format)
    path_8 = tmp_path / "scan-8.png"
    Image.fromarray(eight).save(path_8)
    with Image.open(path) as scan, Image.open(path_8) as scan_8:
        assert scan.mode == opened_mode
        assert np.abs(np.asarray(to_rgb(scan), dtype=int) - gray_rgb(eight)).max() <= 1
        wide, narrow = processor(scan, num_crops=4)["pixel_values"], processor(scan_8, num_crops=4)["pixel_values"]
    level = 1 / 255 / min(CLIP_STD) + 1e-5
    # Tiles are the normalised pixels themselves: one level at most. The bicubic global view weighs 4 x 4 pixels
    # with weights whose absolute values sum to at most 1.375 per axis, so it may differ by up to 1.375^2 levels.
    assert (wide[:, 1:] - narrow[:, 1:]).abs().max() <= level
    assert (wide[:, 0] - narrow[:, 0]).abs().max() <= 1.375**2 * level
    # Today's plain convert("RGB") clips every 16-bit value above 255 to white.
    with Image.open(path) as scan:
        assert (np.asarray(scan.convert("RGB")) == 255).mean() > 0.99


def test_16_bit_modes_of_both_byte_orders_agree():
    eight = random_gray(2)
    sixteen = eight.astype(np.uint16) * 257
    big_endian = Image.frombytes("I;16B", (80, 48), sixteen.astype(">u2").tobytes())
    little_endian = Image.frombytes("I;16L", (80, 48), sixteen.astype("<u2").tobytes())
    for image in (big_endian, little_endian, Image.fromarray(sixteen), Image.fromarray(sixteen.astype(np.int32))):
        assert np.array_equal(np.asarray(to_rgb(image)), gray_rgb(eight)), image.mode


def test_float_and_32_bit_images_are_scaled():
    eight = random_gray(3)
    cases = {
        "float 0..1": eight.astype(np.float32) / 255,
        "float 0..255 (Pillow's scale)": eight.astype(np.float32),
        "float, another range": eight.astype(np.float32) * 40 - 3000,
        "32-bit, full range": eight.astype(np.int32) * (2**31 // 256),
        "signed, like CT numbers": eight.astype(np.int32) * 12 - 1024,
    }
    for name, values in cases.items():
        image = Image.fromarray(values)
        assert image.mode in ("F", "I"), name
        assert np.array_equal(np.asarray(to_rgb(image)), gray_rgb(eight)), name
    with pytest.raises(ValueError, match="'F' image holds NaN or infinite values"):
        to_rgb(Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32)))


def test_8_bit_modes_convert_exactly_as_pil_convert():
    rgba = Image.fromarray(np.random.default_rng(4).integers(0, 256, (48, 80, 4), dtype=np.uint8), "RGBA")
    images = [rgba.convert(mode) for mode in ("1", "L", "LA", "RGB", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV")]
    images += [rgba, rgba.convert("RGB").quantize(64), Image.frombytes("LAB", rgba.size, rgba.convert("RGB").tobytes())]
    images.append(Image.merge("PA", (images[-2], rgba.getchannel("A"))))
    for image in images:
        assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB"))), image.mode


def test_palette_transparency_is_dropped_not_composited(tmp_path):
    palette = Image.new("P", (6, 4))
    palette.putpalette([200, 10, 10, 0, 0, 255] + [0, 0, 0] * 254)
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "logo.png", transparency=0)
    with Image.open(tmp_path / "logo.png") as logo:
        assert logo.mode == "P" and "transparency" in logo.info
        pixels = np.asarray(to_rgb(logo))
    # The transparent entry keeps its own colour, as convert("RGB") gives it; compositing would make it white.
    assert pixels[0, 0].tolist() == [0, 0, 255] and pixels[1:, :].reshape(-1, 3).tolist() == [[200, 10, 10]] * 18


def test_premultiplied_alpha_is_undone_before_the_alpha_is_dropped():
    # PIL cannot convert "La" to RGB; 100 premultiplied by alpha 128 is a gray of about 199.
    assert np.asarray(to_rgb(Image.new("La", (2, 2), (100, 128))))[0, 0].tolist() == [199, 199, 199]


class ImageOfUnknownMode(Image.Image):
    """Stands for a mode a future Pillow may add; every mode of Pillow 13 converts."""

    mode = "XYZ;12"


def test_unknown_mode_is_a_named_error(processor):
    image = ImageOfUnknownMode()
    with pytest.raises(ValueError, match=r"cannot convert an image of PIL mode 'XYZ;12' to RGB .*; save the image as 8-bit"):
        to_rgb(image)
    with pytest.raises(ValueError, match="PIL mode 'XYZ;12'"):
        processor(image, num_crops=1)
