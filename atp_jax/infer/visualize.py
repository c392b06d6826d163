"""Pictures of pruning decisions: which image patches each pruning module kept (PIL only)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from atp_jax.data.images import expand_to_square
from atp_jax.fileio import atomic_path

PANEL = 336  # image side of a panel in pixels
TITLE = 28  # height of the title strip above each panel
GAP = 8  # margin around and between panels
DIM = 0.3  # brightness left to pruned patches
HATCH = 10  # spacing of the hatch lines over pruned patches
OUTLINE = (255, 210, 0)  # kept patches' outline
BACKGROUND = (255, 255, 255)


def patch_box(index: int, grid: int, side: int) -> tuple[int, int, int, int]:
    """The pixel box (left, top, right, bottom; inclusive) of patch `index` of a row-major `grid` x `grid`
    image of `side` pixels."""
    row, col = divmod(index, grid)
    x0, x1 = round(col * side / grid), round((col + 1) * side / grid) - 1
    y0, y1 = round(row * side / grid), round((row + 1) * side / grid) - 1
    return x0, y0, x1, y1


def pruned_look(image: Image.Image) -> Image.Image:
    """The image darkened and hatched: how pruned patches look."""
    dark = Image.eval(image, lambda v: int(v * DIM))
    draw = ImageDraw.Draw(dark)
    w, h = dark.size
    for offset in range(-h, w, HATCH):  # diagonal lines, top-left to bottom-right
        draw.line([(offset, 0), (offset + h, h)], fill=(90, 90, 90), width=1)
    return dark


def draw_panel(base: Image.Image, kept: set[int], grid: int) -> Image.Image:
    """`base` (square RGB) with the patches not in `kept` darkened and hatched, the kept ones outlined."""
    side = base.size[0]
    pruned_mask = Image.new("L", base.size, 0)
    mask_draw = ImageDraw.Draw(pruned_mask)
    for index in range(grid * grid):
        if index not in kept:
            mask_draw.rectangle(patch_box(index, grid, side), fill=255)
    panel = Image.composite(pruned_look(base), base, pruned_mask)
    draw = ImageDraw.Draw(panel)
    for index in sorted(kept):
        draw.rectangle(patch_box(index, grid, side), outline=OUTLINE, width=1)
    return panel


def title_font(size: int = 16):
    try:
        return ImageFont.load_default(size=size)  # a scalable font when PIL has FreeType
    except (TypeError, OSError):  # older PIL or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_kept(image: Image.Image, kept_per_module: Sequence[Sequence[int]], grid: int, layers: Sequence[int],
              out_path: str | os.PathLike, panel: int = PANEL, cls_first: bool = False) -> Path:
    """Writes `kept_picture(...)` as a PNG file that appears atomically. Returns its path."""
    return save_atomic(kept_picture(image, kept_per_module, grid, layers, panel, cls_first), out_path)


def kept_picture(image: Image.Image, kept_per_module: Sequence[Sequence[int]], grid: int, layers: Sequence[int],
                 panel: int = PANEL, cls_first: bool = False) -> Image.Image:
    """One picture with a panel per pruning module, side by side: the padded-to-square image with the
    patches that module did not keep darkened and hatched, titled "after layer L: K / N kept".

    kept_per_module: per module, the kept visual token indices (row-major patches of the `grid` x `grid`
    image; with `cls_first` index 0 is CLS, which has no patch). layers: the decoder layer each module follows.
    Without modules (no pruning) one panel shows every patch kept.
    """
    if len(kept_per_module) != len(layers):
        raise ValueError(f"{len(kept_per_module)} kept lists for {len(layers)} module layers")
    n = grid * grid
    shift = 1 if cls_first else 0
    patches = [{i - shift for i in kept if 0 <= i - shift < n} for kept in kept_per_module]
    titles = [f"after layer {layer}: {len(p)} / {n} kept" for layer, p in zip(layers, patches, strict=True)]
    if not patches:
        patches, titles = [set(range(n))], [f"no pruning: {n} / {n} kept"]
    base = expand_to_square(image).resize((panel, panel), Image.Resampling.BICUBIC)
    sheet = Image.new("RGB", (len(patches) * (panel + GAP) + GAP, panel + TITLE + 2 * GAP), BACKGROUND)
    draw, font = ImageDraw.Draw(sheet), title_font()
    for m, (kept, title) in enumerate(zip(patches, titles, strict=True)):
        x = GAP + m * (panel + GAP)
        left, top, right, bottom = draw.textbbox((0, 0), title, font=font)  # centred by hand: bitmap fonts
        draw.text((x + (panel - right - left) // 2, GAP + (TITLE - bottom - top) // 2), title, fill=(0, 0, 0),
                  font=font)  # take no anchor
        sheet.paste(draw_panel(base, kept, grid), (x, GAP + TITLE))
    return sheet


def save_atomic(image: Image.Image, out_path: str | os.PathLike) -> Path:
    """Saves a PNG to a temporary sibling and renames it into place, so readers never see half a file."""
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        image.save(tmp, format="PNG")
    return out_path
