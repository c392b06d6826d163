"""atp_jax.data.images: parity with transformers' PIL-backend CLIP processor, LLaVA padding, modes, EXIF, bad input."""

import functools
import io
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile
from transformers import CLIPImageProcessorPil
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from atp_jax.data import images as im
from atp_jax.data.images import ImageError


@functools.cache
def hf_processor(size: int) -> CLIPImageProcessorPil:
    # CLIPImageProcessorPil is the PIL/numpy backend (transformers 5.x); CLIPImageProcessor is the torchvision one.
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def hf_pixels(img: Image.Image, size: int = 336) -> np.ndarray:
    return hf_processor(size)(img, return_tensors="np")["pixel_values"][0]


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def gradient(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 127.5 * (x / max(w - 1, 1) + y / max(h - 1, 1))])
    return Image.fromarray(np.round(arr).astype(np.uint8).transpose(1, 2, 0))


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def opened(path) -> Image.Image:
    """The file as PIL opens it (mode, size, info), fully read and closed."""
    with Image.open(path) as f:
        f.load()
        return f


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


# ---- constants ---------------------------------------------------------------------------------------------------

def test_constants_match_transformers_and_llava():
    assert im.CLIP_MEAN == tuple(OPENAI_CLIP_MEAN)
    assert im.CLIP_STD == tuple(OPENAI_CLIP_STD)
    assert im.PAD_FILL == tuple(int(x * 255) for x in OPENAI_CLIP_MEAN) == (122, 116, 104)
    assert hf_processor(336).backend == "pil"
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # the truncation tests rely on PIL's default


# ---- "crop": parity with transformers -----------------------------------------------------------------------------

# (337, 502): 336 * 502 / 337 = 500.51, so truncating (HF) and rounding the long edge differ.
SHAPES = [(500, 375), (375, 500), (336, 336), (400, 400), (100, 60), (60, 100), (337, 501), (501, 337), (337, 502),
          (7, 3)]


@pytest.mark.parametrize("w,h", SHAPES)
@pytest.mark.parametrize("make", [noise, gradient], ids=["noise", "gradient"])
def test_crop_matches_hf(w, h, make):
    img = make(w, h)
    ours = im.preprocess(img, 336, mode="crop")
    assert ours.shape == (3, 336, 336) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, hf_pixels(img, 336), rtol=0, atol=1e-5)


@pytest.mark.parametrize("w,h", [(500, 375), (375, 500), (56, 56), (100, 60), (337, 501), (57, 1000)])
def test_crop_small_size_matches_hf(w, h):
    for img in (noise(w, h, seed=1), gradient(w, h)):
        ours = im.clip_preprocess(img, 56)
        assert ours.shape == (3, 56, 56) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, hf_pixels(img, 56), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK"])
def test_crop_non_rgb_input_matches_hf(mode):
    # HF converts with its own convert_to_rgb (white compositing); to_rgb must agree for the modes it shares.
    rng = np.random.default_rng(2)
    rgba = Image.fromarray(rng.integers(0, 256, (90, 130, 4), dtype=np.uint8), "RGBA")
    img = rgba if mode == "RGBA" else rgba.convert(mode)
    np.testing.assert_allclose(im.preprocess(img, 56, mode="crop"), hf_pixels(img, 56), rtol=0, atol=1e-5)


# ---- "pad": LLaVA's expand2square --------------------------------------------------------------------------------

@pytest.mark.parametrize("w,h,size", [(500, 375, 336), (375, 500, 336), (101, 60, 336), (337, 501, 336),
                                      (60, 101, 56), (300, 300, 56)])
def test_pad_matches_direct_construction(w, h, size):
    img = noise(w, h, seed=3)
    side = max(w, h)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = (122, 116, 104)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = np.asarray(img)
    expected = hf_pixels(Image.fromarray(canvas), size)
    ours = im.preprocess(img, size, mode="pad")
    assert ours.shape == (3, size, size) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_expand_to_square_offsets_literal():
    red, green, blue, fill = (255, 0, 0), (0, 255, 0), (0, 0, 255), (122, 116, 104)
    wide = Image.fromarray(np.array([[red, green, blue]], np.uint8))  # w=3, h=1 -> middle row
    np.testing.assert_array_equal(pixels(im.expand_to_square(wide)),
                                  np.array([[fill] * 3, [red, green, blue], [fill] * 3], np.uint8))
    tall = Image.fromarray(np.array([[red], [green]], np.uint8))  # w=1, h=2 -> offset (2 - 1) // 2 = 0
    np.testing.assert_array_equal(pixels(im.expand_to_square(tall)), np.array([[red, fill], [green, fill]], np.uint8))
    odd = Image.fromarray(np.zeros((5, 2, 3), np.uint8))  # w=2, h=5 -> left offset floor(1.5) = 1
    got = pixels(im.expand_to_square(odd))
    assert (got[:, 1:3] == 0).all() and (got[:, 0] == fill).all() and (got[:, 3:] == fill).all()
    square = noise(4, 4)
    np.testing.assert_array_equal(pixels(im.expand_to_square(square)), np.asarray(square))
    np.testing.assert_array_equal(pixels(im.expand_to_square(wide, fill=(1, 2, 3)))[0], [[1, 2, 3]] * 3)


def test_preprocess_modes():
    wide, square = noise(120, 80), noise(90, 90)
    assert not np.allclose(im.preprocess(wide, 56, "pad"), im.preprocess(wide, 56, "crop"))
    np.testing.assert_array_equal(im.preprocess(square, 56, "pad"), im.preprocess(square, 56, "crop"))
    with pytest.raises(ValueError, match="'pad'.*'crop'"):
        im.preprocess(wide, 56, mode="resize")


# ---- mode conversion ---------------------------------------------------------------------------------------------

def test_greyscale_and_bilevel(tmp_path):
    grey = Image.fromarray(np.array([[0, 77, 255]], np.uint8), "L")
    np.testing.assert_array_equal(pixels(im.load_image(save(grey, tmp_path / "l.png"))),
                                  [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]])
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    path = save(bilevel, tmp_path / "one.png")
    assert opened(path).mode == "1"
    np.testing.assert_array_equal(pixels(im.load_image(path)), [[[0, 0, 0], [255, 255, 255]]])


def test_alpha_composited_on_white(tmp_path):
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [200, 100, 0, 128]]], np.uint8), "RGBA")
    got = pixels(im.load_image(save(rgba, tmp_path / "rgba.png")))
    np.testing.assert_array_equal(got[0, :2], [[255, 255, 255], [10, 20, 30]])
    np.testing.assert_array_equal(got, hf_convert_to_rgb(rgba, return_numpy=True))  # half alpha: same as HF
    la = Image.fromarray(np.array([[[200, 0], [200, 255], [100, 128]]], np.uint8), "LA")
    path = save(la, tmp_path / "la.png")
    assert opened(path).mode == "LA"
    got = pixels(im.load_image(path))
    np.testing.assert_array_equal(got[0, :2], [[255, 255, 255], [200, 200, 200]])
    np.testing.assert_array_equal(got, hf_convert_to_rgb(la, return_numpy=True))
    rgb_trns = Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8))
    path = save(rgb_trns, tmp_path / "rgb_trns.png", transparency=(1, 2, 3))
    np.testing.assert_array_equal(pixels(im.load_image(path)), [[[255, 255, 255], [4, 5, 6]]])


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    pal.putdata([0, 1, 2])
    np.testing.assert_array_equal(pixels(im.load_image(save(pal, tmp_path / "p.png"))),
                                  [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]])
    path = save(pal, tmp_path / "p_trns.png", transparency=1)
    assert "transparency" in opened(path).info
    np.testing.assert_array_equal(pixels(im.load_image(path)), [[[255, 0, 0], [255, 255, 255], [0, 0, 255]]])
    pa = Image.new("PA", (2, 1))
    pa.putpalette([9, 8, 7])
    pa.putpixel((0, 0), (0, 255))
    pa.putpixel((1, 0), (0, 0))
    np.testing.assert_array_equal(pixels(im.to_rgb(pa)), [[[9, 8, 7], [255, 255, 255]]])


def test_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    path = save(cmyk, tmp_path / "cmyk.tif")
    assert opened(path).mode == "CMYK"
    np.testing.assert_array_equal(pixels(im.load_image(path)), [[[255, 255, 255], [0, 255, 255]]])


def test_sixteen_bit_greyscale_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128, 129, 255, 257, 32768, 65535]], np.uint16)
    path = save(Image.fromarray(values), tmp_path / "i16.png")
    assert opened(path).mode == "I;16"
    got = pixels(im.load_image(path))
    expected = [0, 0, 1, 1, 1, 128, 255]  # round(v / 257)
    np.testing.assert_array_equal(got, np.repeat(np.array(expected, np.uint8)[None, :, None], 3, axis=2))
    big_endian = Image.frombytes("I;16B", (2, 1), np.array([32768, 65535], ">u2").tobytes())
    np.testing.assert_array_equal(pixels(im.to_rgb(big_endian))[0, :, 0], [128, 255])


def test_int32_and_float_greyscale_use_the_16_bit_rule():
    as_int = Image.fromarray(np.array([[-5, 514, 70000]], np.int32), "I")
    np.testing.assert_array_equal(pixels(im.to_rgb(as_int))[0, :, 0], [0, 2, 255])
    as_float = Image.fromarray(np.array([[np.nan, -1.0, 25700.0, 1e9]], np.float32), "F")
    np.testing.assert_array_equal(pixels(im.to_rgb(as_float))[0, :, 0], [0, 0, 100, 255])


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_exif_orientation_applied(tmp_path, ext):
    arr = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3) * 10  # h=2, w=4
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(img, tmp_path / f"exif.{ext}", exif=exif, **({"quality": 100} if ext == "jpg" else {}))
    assert opened(path).size == (4, 2)
    loaded = im.load_image(path)
    assert loaded.size == (2, 4)
    if ext == "png":  # lossless: exact pixels
        np.testing.assert_array_equal(pixels(loaded), np.rot90(arr, k=-1))


# ---- bad input ---------------------------------------------------------------------------------------------------

def raises_naming(expected: str, fn, *args, **kw) -> str:
    with pytest.raises(ImageError) as info:
        fn(*args, **kw)
    assert expected in str(info.value)
    return str(info.value)


def test_missing_file_and_directory(tmp_path):
    assert "no such file" in raises_naming("nope.png", im.load_image, tmp_path / "nope.png")
    raises_naming(str(tmp_path), im.load_image, tmp_path)  # a directory: open() fails with IsADirectoryError


def test_not_an_image(tmp_path):
    path = tmp_path / "text.png"
    path.write_text("definitely not a PNG\n")
    msg = raises_naming("text.png", im.load_image, path)
    assert "cannot decode" in msg
    raises_naming("<bytes>", im.load_image, b"garbage bytes")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    buf = io.BytesIO()
    noise(64, 64, seed=4).save(buf, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert "truncated" in raises_naming(path.name, im.load_image, path)
    with pytest.raises(ImageError) as info:
        im.load_image(path.read_bytes())
    assert "<bytes>" in str(info.value) and isinstance(info.value.__cause__, OSError)


def test_zero_size_image():
    # PIL can neither write nor open a zero-size file, so the check is exercised on in-memory images.
    for size in [(0, 5), (5, 0)]:
        assert "zero-size" in raises_naming("empty.png", im.check_image, Image.new("RGB", size), name="empty.png")
    with pytest.raises(ImageError, match="zero-size"):
        im.clip_preprocess(Image.new("RGB", (0, 5)), 56)


def test_max_pixels(tmp_path):
    path = save(noise(20, 20), tmp_path / "big.png")
    assert "too large" in raises_naming("big.png", im.load_image, path, max_pixels=399)
    assert im.load_image(path, max_pixels=400).size == (20, 20)
    assert im.load_image(path, max_pixels=None).size == (20, 20)


@pytest.mark.parametrize("side", [40, 50])  # 1600 px: PIL warns; 2500 px: PIL raises
def test_decompression_bomb(tmp_path, monkeypatch, side):
    path = save(noise(side, side), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    filters = list(warnings.filters)
    assert "decompression-bomb" in raises_naming("bomb.png", im.load_image, path, max_pixels=None)
    assert warnings.filters == filters  # the temporary "error" filter is gone


# ---- bytes and the convenience wrapper ---------------------------------------------------------------------------

def test_bytes_same_as_path(tmp_path):
    rgba = Image.fromarray(np.random.default_rng(5).integers(0, 256, (30, 50, 4), dtype=np.uint8), "RGBA")
    exif = rgba.getexif()
    exif[0x0112] = 8
    path = save(rgba, tmp_path / "img.png", exif=exif)
    from_path = pixels(im.load_image(path))
    assert from_path.shape == (50, 30, 3)
    for source in (path.read_bytes(), bytearray(path.read_bytes()), str(path)):
        np.testing.assert_array_equal(pixels(im.load_image(source)), from_path)
    expected = im.preprocess(im.load_image(path), 56, "pad")
    np.testing.assert_array_equal(im.load_and_preprocess(path.read_bytes(), 56), expected)
    upright = opened(path).transpose(Image.Transpose.ROTATE_90)  # orientation 8: rotate 90 CCW to display
    np.testing.assert_array_equal(im.load_and_preprocess(path, 56, mode="crop"), im.preprocess(upright, 56, "crop"))


def test_load_and_preprocess_checks_mode_first(tmp_path):
    with pytest.raises(ValueError, match="unknown image mode") as info:
        im.load_and_preprocess(tmp_path / "missing.png", mode="squash")
    assert not isinstance(info.value, ImageError)
