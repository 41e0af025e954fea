"""What a training run leaves behind besides checkpoints: the epoch log (JSON lines), PNG plots of
the loss and metric curves, and prediction overlays (image, truth, prediction). Drawn with
Pillow's ImageDraw only: no plotting library needed."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["write_jsonl", "line_plot", "overlay_grid", "nice_ticks"]

# Colour-blind-safe (Okabe–Ito) for curves; classes reuse it from the second entry on.
PALETTE = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0),
           (86, 180, 233), (240, 228, 66), (0, 0, 0)]
# Classes 1, 2, ... over images: the same colour-blind-safe set, cool colours first (they stand
# out on the reddish tissue of endoscopy and dermoscopy as on gray scans).
MASK_COLOURS = [(86, 180, 233), (0, 158, 115), (240, 228, 66), (204, 121, 167), (213, 94, 0),
                (0, 114, 178), (230, 159, 0)]


def write_jsonl(path: str | Path, records: Sequence[Mapping]) -> Path:
    """Write ``records`` as JSON lines (one object per line) atomically; non-finite floats are
    written as ``null``."""
    path = Path(path)
    clean = ({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
              for k, v in r.items()} for r in records)
    text = "".join(json.dumps(r) + "\n" for r in clean)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 × 10^k, at least 1 with
    ``integer``) covering ``[low, high]``."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        high = low + (abs(low) or 1.0) * 0.1
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(step, 1)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _label(value: float) -> str:
    return f"{value:.4g}"


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *,
              title: str = "", xlabel: str = "", ylabel: str = "",
              size: tuple[int, int] = (720, 440)) -> Path:
    """Draw curves ``{name: (xs, ys)}`` into a PNG with axes, labelled ticks and a legend.

    Non-finite values are skipped (a gap in the curve). Returns ``path``.
    """
    width, height = size
    left, right, top, bottom = 74, 24, 44, 58
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys)
              if math.isfinite(x) and math.isfinite(y)]
    integer_x = all(float(x).is_integer() for x, _ in points)
    x_ticks = nice_ticks(min(p[0] for p in points), max(p[0] for p in points),
                         integer=integer_x) if points else []
    y_ticks = nice_ticks(min(p[1] for p in points), max(p[1] for p in points)) if points else []
    x0, x1 = (x_ticks[0], x_ticks[-1]) if x_ticks else (0.0, 1.0)
    y0, y1 = (y_ticks[0], y_ticks[-1]) if y_ticks else (0.0, 1.0)
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_px(x, y):
        return (left + (x - x0) / ((x1 - x0) or 1) * plot_w,
                top + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h)

    for t in y_ticks:
        _, py = to_px(x0, t)
        draw.line([(left, py), (left + plot_w, py)], fill=(232, 232, 232))
        draw.line([(left - 5, py), (left, py)], fill="black")
        draw.text((left - 8, py), _label(t), fill="black", font=font, anchor="rm")
    for t in x_ticks:
        px, _ = to_px(t, y0)
        draw.line([(px, top), (px, top + plot_h)], fill=(232, 232, 232))
        draw.line([(px, top + plot_h), (px, top + plot_h + 5)], fill="black")
        draw.text((px, top + plot_h + 8), _label(t), fill="black", font=font, anchor="mt")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    draw.text((left + plot_w / 2, 14), title, fill="black", font=font, anchor="mt")
    draw.text((left + plot_w / 2, height - 14), xlabel, fill="black", font=font, anchor="mb")
    draw.text((8, top - 16), ylabel, fill="black", font=font, anchor="lm")
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        segment = []
        for x, y in list(zip(xs, ys)) + [(math.nan, math.nan)]:
            if math.isfinite(x) and math.isfinite(y):
                segment.append(to_px(x, y))
                continue
            if len(segment) > 1:
                draw.line(segment, fill=colour, width=2)
            for px, py in segment:
                draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=colour)
            segment = []
    legend = list(series)
    if legend:
        row = 16
        box_w = 30 + max(draw.textlength(n, font=font) for n in legend)
        bx, by = left + plot_w - box_w - 8, top + 8
        draw.rectangle([bx, by, bx + box_w, by + row * len(legend) + 6], fill="white",
                       outline=(160, 160, 160))
        for i, name in enumerate(legend):
            cy = by + 11 + i * row
            draw.line([(bx + 6, cy), (bx + 22, cy)], fill=PALETTE[i % len(PALETTE)], width=3)
            draw.text((bx + 26, cy), name, fill="black", font=font, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _display(image: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` float → ``uint8 (H, W, 3)``, min–max stretched (first 3 channels, or gray)."""
    image = image.detach().float().cpu()
    image = image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)
    low, high = image.min(), image.max()
    image = (image - low) / (high - low).clamp_min(1e-12)
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _blend(base: np.ndarray, classes: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    out = base.astype(np.float32)
    for c in np.unique(classes):
        if c == 0:
            continue
        colour = np.array(MASK_COLOURS[(int(c) - 1) % len(MASK_COLOURS)], np.float32)
        where = classes == c
        out[where] = (1 - alpha) * out[where] + alpha * colour
    return out.round().astype(np.uint8)


def overlay_image(array: np.ndarray, classes: np.ndarray, axis: int = 2) -> np.ndarray:
    """A prediction over its image, as ``uint8 (H, W, 3)``: ``array`` an image ``(H, W[, C])``
    with ``classes`` ``(H, W)``, or a volume ``(X, Y, Z[, C])`` with ``classes`` ``(X, Y, Z)``,
    shown at the slice across ``axis`` with the most foreground (the middle one if none)."""
    if classes.ndim == 3:
        counts = (classes > 0).sum(axis=tuple(a for a in range(3) if a != axis))
        k = int(counts.argmax()) if counts.any() else classes.shape[axis] // 2
        array, classes = np.take(array, k, axis=axis), np.take(classes, k, axis=axis)
    image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    image = image[None] if image.ndim == 2 else image.permute(2, 0, 1)
    return _blend(_display(image), classes)


def overlay_grid(images: torch.Tensor, truths: torch.Tensor, predictions: torch.Tensor,
                 path: str | Path, *, min_size: int = 160) -> Path:
    """One PNG with a row per sample: the image, the truth over it, the prediction over it.

    ``images`` ``[K, C, H, W]`` (any intensity scale), ``truths`` and ``predictions`` ``[K, H,
    W]`` class indices (0 = background, drawn transparent). Small images are enlarged (nearest)
    to at least ``min_size`` pixels. Returns ``path``.
    """
    font = ImageFont.load_default()
    k, _, h, w = images.shape
    scale = max(1, math.ceil(min_size / min(h, w)))
    cell_h, cell_w, header, gap = h * scale, w * scale, 18, 4
    grid = Image.new("RGB", (3 * cell_w + 4 * gap, header + k * (cell_h + gap) + gap), "white")
    draw = ImageDraw.Draw(grid)
    for col, name in enumerate(("image", "truth", "prediction")):
        draw.text((gap + col * (cell_w + gap) + cell_w / 2, 4), name, fill="black", font=font,
                  anchor="mt")
    for row in range(k):
        base = _display(images[row])
        cells = (base, _blend(base, truths[row].cpu().numpy()),
                 _blend(base, predictions[row].cpu().numpy()))
        for col, cell in enumerate(cells):
            tile = Image.fromarray(cell).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(tile, (gap + col * (cell_w + gap), header + row * (cell_h + gap)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
