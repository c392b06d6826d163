"""LLaVA-1.5 image loading (safe decode, EXIF, any mode to RGB) and CLIP pre-processing (pad / crop)."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

# OpenAI CLIP statistics, as in transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA's expand2square background: `tuple(int(x * 255) for x in image_mean)` (truncated, not rounded).
PAD_FILL = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)
MAX_PIXELS = 64_000_000  # default refusal limit (64 megapixels), checked from the header before decoding
MODES = ("pad", "crop")

# Single-channel modes deeper than 8 bits; PIL's own .convert("RGB") clips them at 255 instead of scaling.
_HIGH_DEPTH = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class ImageError(ValueError):
    """An image that cannot be used: missing, unreadable, corrupt, truncated, zero-size or too large."""


def check_image(img: Image.Image, max_pixels: int | None = MAX_PIXELS, name: str = "<image>") -> None:
    """Raise ImageError (naming `name`) if `img` has a zero width or height, or more than `max_pixels`
    pixels (`None` disables the size limit). Only `img.size` is read, so this is cheap on a lazily opened
    file whose pixels have not been decoded yet.
    """
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError(f"{name}: zero-size image ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(f"{name}: image too large ({w}x{h} = {w * h} pixels > max_pixels={max_pixels})")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to mode RGB (uint8[H, W, 3] as an array).

    - Alpha ("A" band: LA, RGBA, PA) or a `transparency` entry in `img.info` (P, L, RGB with tRNS): composited
      onto white exactly as transformers' `convert_to_rgb` does (`convert("RGBA")`, `alpha_composite` over an
      opaque white canvas, `convert("RGB")`).
    - 16/32-bit greyscale (I;16*, I, F): the value is clipped to [0, 65535] and mapped to 8 bits with
      `round(v / 257)` (so 65535 -> 255, 32768 -> 128, 257 -> 1); NaN counts as 0. I and F get the same
      16-bit rule because PIL also uses mode I for 16-bit data; pixels equal to a `transparency` value become
      white. The grey level is replicated to the three channels.
    - Everything else (1, L, P, CMYK, YCbCr, ...): PIL's `convert("RGB")`.
    """
    if img.mode in _HIGH_DEPTH:
        raw = np.asarray(img)
        v = np.clip(np.nan_to_num(raw.astype(np.float64), nan=0.0), 0.0, 65535.0)
        grey = np.floor(v / 257.0 + 0.5).astype(np.uint8)  # round half up; integer v never hits a tie
        transparency = img.info.get("transparency")
        if isinstance(transparency, (int, float)):
            grey[raw == transparency] = 255  # fully transparent over white
        return Image.fromarray(grey, "L").convert("RGB")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(source: str | os.PathLike | bytes, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Open an image file path or encoded bytes and return it fully decoded, EXIF-orientation applied and
    converted to mode RGB by `to_rgb` (uint8[H, W, 3] as an array).

    Every failure is an ImageError naming the file (or "<bytes>"): missing or unreadable file, unknown or corrupt
    data, truncated data (the full decode is forced, and PIL's LOAD_TRUNCATED_IMAGES is left off), zero width or
    height, more than `max_pixels` pixels (checked from the header, before decoding) and PIL's own
    decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, which still applies when `max_pixels` is larger).
    """
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    name = "<bytes>" if is_bytes else os.fspath(source)
    try:
        fp = io.BytesIO(bytes(source)) if is_bytes else open(name, "rb")  # closed by `with` below
    except FileNotFoundError as e:
        raise ImageError(f"{name}: no such file") from e
    except OSError as e:
        raise ImageError(f"{name}: cannot read file ({e})") from e

    # PIL only *warns* between MAX_IMAGE_PIXELS and twice that; make the warning an error so it is refused too.
    # (catch_warnings swaps the process-wide filter list; a race with another thread could at worst leave this
    # one "error" filter installed, which only affects DecompressionBombWarning.)
    with fp, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
            check_image(img, max_pixels, name)
            img.load()  # Image.open is lazy: decode now so corrupt or truncated data fails here
            return to_rgb(ImageOps.exif_transpose(img))
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"{name}: over PIL's decompression-bomb limit ({e})") from e
        except Exception as e:  # PIL plugins raise OSError, SyntaxError, ValueError, struct.error, EOFError, ...
            raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


def expand_to_square(img: Image.Image, fill: tuple[int, int, int] = PAD_FILL) -> Image.Image:
    """LLaVA's `expand2square`: return an RGB image of side max(w, h) filled with `fill`, with `img` (converted
    by `to_rgb`) pasted at ((side - w) // 2, (side - h) // 2). A square image is returned unchanged.
    """
    img = to_rgb(img)
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def clip_preprocess(img: Image.Image, size: int = 336) -> np.ndarray:
    """CLIP pre-processing identical to transformers' `CLIPImageProcessorPil` with shortest_edge = crop = `size`:
    `to_rgb`, bicubic PIL resize of the short edge to `size` (long edge `int(size * long / short)`, truncated),
    centre crop at floor offsets, `x * (1/255)` in float64 cast to float32, then `(x - CLIP_MEAN) / CLIP_STD`
    in float32. Returns float32[3, size, size] (channels first).
    """
    img = to_rgb(img)
    check_image(img, max_pixels=None)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # same expression as HF's get_resize_output_image_size
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    x = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC))
    # Both edges are now >= size, so HF's zero padding for too-small crops never applies.
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[top:top + size, left:left + size]
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # HF rescales in float64, then downcasts
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(img: Image.Image, size: int = 336, mode: str = "pad") -> np.ndarray:
    """LLaVA-1.5 image pre-processing to float32[3, size, size]: mode "pad" (what LLaVA-1.5 trained with)
    squares the image with `expand_to_square` before `clip_preprocess`; mode "crop" applies `clip_preprocess`
    directly (short-edge resize and centre crop). Any other mode is a ValueError.
    """
    if mode not in MODES:
        raise ValueError(f"unknown image mode {mode!r}; expected one of {MODES}")
    if mode == "pad":
        img = expand_to_square(img)
    return clip_preprocess(img, size)


def load_and_preprocess(source: str | os.PathLike | bytes, size: int = 336, mode: str = "pad",
                        max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """`load_image` then `preprocess`: a file path or encoded bytes to float32[3, size, size]; raises ImageError
    for a bad image and ValueError for an unknown mode (checked before the file is read).
    """
    if mode not in MODES:
        raise ValueError(f"unknown image mode {mode!r}; expected one of {MODES}")
    return preprocess(load_image(source, max_pixels), size, mode)
