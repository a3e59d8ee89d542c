"""Draw a :class:`Scene` as an RGB image and compute the low-level maps voxels respond to."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from brainmclip.errors import InvalidInputError

from .scenes import BACKGROUNDS, COLOURS, Scene, SceneObject

__all__ = ["LOW_LEVEL_CHANNELS", "low_level_maps", "render_object_masks", "render_scene"]

LOW_LEVEL_CHANNELS = ("contrast", "red-green", "blue-yellow")
_SKIN = (232, 190, 160)
_DARK = (30, 30, 30)


def _shade(colour, factor):
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)


def _background(scene: Scene, size: int) -> Image.Image:
    upper, lower, horizon, _ = BACKGROUNDS[scene.background]
    rng = np.random.default_rng(scene.texture_seed)
    rows = np.linspace(0, 1, size)[:, None, None]
    split = rows >= horizon
    img = np.where(split, np.asarray(lower, float), np.asarray(upper, float)) * np.ones((1, size, 1))
    # Coarse luminance texture, upsampled, so backgrounds carry some contrast of their own.
    coarse = rng.normal(0, 1, (8, 8)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
    img += 12.0 * texture[:, :, None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, size: int) -> None:
    h = obj.size * size  # object height in pixels
    cx, cy = obj.x * size, obj.y * size
    colour = COLOURS[obj.colour]
    dark = _shade(colour, 0.55)
    lw = max(1, int(h / 14))

    def box(x0, y0, x1, y1):  # fractions of the object's box -> pixels
        return [cx + x0 * h, cy + y0 * h, cx + x1 * h, cy + y1 * h]

    c = obj.category
    if c == "person":
        draw.ellipse(box(-0.12, -0.5, 0.12, -0.26), fill=_SKIN)
        draw.rectangle(box(-0.15, -0.26, 0.15, 0.12), fill=colour)
        draw.line(box(-0.15, -0.2, -0.3, 0.05), fill=colour, width=lw)
        draw.line(box(0.15, -0.2, 0.3, 0.05), fill=colour, width=lw)
        draw.line(box(-0.08, 0.12, -0.12, 0.5), fill=_DARK, width=lw)
        draw.line(box(0.08, 0.12, 0.12, 0.5), fill=_DARK, width=lw)
    elif c == "face":
        draw.ellipse(box(-0.4, -0.5, 0.4, 0.5), fill=colour, outline=dark, width=lw)
        draw.ellipse(box(-0.22, -0.2, -0.08, -0.06), fill=_DARK)
        draw.ellipse(box(0.08, -0.2, 0.22, -0.06), fill=_DARK)
        draw.arc(box(-0.2, 0.0, 0.2, 0.3), start=20, end=160, fill=_DARK, width=lw)
    elif c == "dog":
        draw.ellipse(box(-0.45, -0.15, 0.3, 0.2), fill=colour)
        draw.ellipse(box(0.2, -0.4, 0.5, -0.08), fill=colour)
        draw.polygon([tuple(box(0.22, -0.35, 0, 0)[:2]), tuple(box(0.25, -0.55, 0, 0)[:2]),
                      tuple(box(0.32, -0.38, 0, 0)[:2])], fill=dark)
        for lx in (-0.35, -0.2, 0.05, 0.2):
            draw.rectangle(box(lx, 0.1, lx + 0.07, 0.45), fill=dark)
        draw.line(box(-0.45, 0.0, -0.6, -0.2), fill=dark, width=lw)
        draw.ellipse(box(0.38, -0.3, 0.42, -0.26), fill=_DARK)
    elif c == "bird":
        draw.ellipse(box(-0.4, -0.2, 0.3, 0.2), fill=colour)
        draw.polygon([tuple(box(-0.2, -0.05, 0, 0)[:2]), tuple(box(0.1, -0.05, 0, 0)[:2]),
                      tuple(box(-0.15, -0.45, 0, 0)[:2])], fill=dark)
        draw.polygon([tuple(box(0.28, -0.06, 0, 0)[:2]), tuple(box(0.45, 0.0, 0, 0)[:2]),
                      tuple(box(0.28, 0.06, 0, 0)[:2])], fill=COLOURS["orange"])
        draw.ellipse(box(0.15, -0.1, 0.2, -0.05), fill=_DARK)
    elif c == "car":
        draw.rectangle(box(-0.6, -0.1, 0.6, 0.25), fill=colour)
        draw.polygon([tuple(box(-0.35, -0.1, 0, 0)[:2]), tuple(box(-0.2, -0.38, 0, 0)[:2]),
                      tuple(box(0.25, -0.38, 0, 0)[:2]), tuple(box(0.4, -0.1, 0, 0)[:2])], fill=dark)
        draw.rectangle(box(-0.15, -0.32, 0.2, -0.12), fill=(170, 210, 240))
        draw.ellipse(box(-0.45, 0.12, -0.2, 0.37), fill=_DARK)
        draw.ellipse(box(0.2, 0.12, 0.45, 0.37), fill=_DARK)
    elif c == "boat":
        draw.polygon([tuple(box(-0.6, 0.1, 0, 0)[:2]), tuple(box(0.6, 0.1, 0, 0)[:2]),
                      tuple(box(0.4, 0.4, 0, 0)[:2]), tuple(box(-0.4, 0.4, 0, 0)[:2])], fill=colour)
        draw.line(box(0.0, -0.55, 0.0, 0.1), fill=_DARK, width=lw)
        draw.polygon([tuple(box(0.03, -0.5, 0, 0)[:2]), tuple(box(0.45, 0.05, 0, 0)[:2]),
                      tuple(box(0.03, 0.05, 0, 0)[:2])], fill=(245, 245, 245))
    elif c == "house":
        draw.rectangle(box(-0.45, -0.1, 0.45, 0.5), fill=colour)
        draw.polygon([tuple(box(-0.55, -0.1, 0, 0)[:2]), tuple(box(0.0, -0.5, 0, 0)[:2]),
                      tuple(box(0.55, -0.1, 0, 0)[:2])], fill=(150, 45, 35))
        draw.rectangle(box(-0.1, 0.2, 0.1, 0.5), fill=(90, 55, 25))
        draw.rectangle(box(0.2, 0.05, 0.35, 0.2), fill=(170, 210, 240))
    elif c == "tree":
        draw.rectangle(box(-0.07, 0.0, 0.07, 0.5), fill=(100, 65, 30))
        draw.ellipse(box(-0.35, -0.5, 0.35, 0.1), fill=colour)
        draw.ellipse(box(-0.2, -0.4, 0.0, -0.2), fill=dark)
    elif c == "sign":
        draw.rectangle(box(-0.03, 0.0, 0.03, 0.5), fill=(120, 120, 120))
        draw.rectangle(box(-0.45, -0.45, 0.45, 0.05), fill=colour, outline=_DARK, width=lw)
        # Glyph strokes: dense, high-frequency marks are what makes text text for the visual system.
        for row in range(3):
            y = -0.36 + row * 0.14
            for col in range(5):
                x = -0.36 + col * 0.15
                draw.rectangle(box(x, y, x + 0.1, y + 0.05), fill=_DARK)
    elif c == "ball":
        draw.ellipse(box(-0.3, -0.3, 0.3, 0.3), fill=colour, outline=dark, width=lw)
        draw.arc(box(-0.3, -0.15, 0.3, 0.45), start=200, end=340, fill=(250, 250, 250), width=lw)
    else:  # pragma: no cover - CATEGORIES and this function are edited together
        raise InvalidInputError(f"No drawing for category={c!r}")


def render_scene(scene: Scene, size: int) -> np.ndarray:
    """Render ``scene`` as a ``(size, size, 3)`` uint8 array."""
    img = _background(scene, size)
    draw = ImageDraw.Draw(img)
    # Back to front: higher objects (smaller y) are farther away.
    for obj in sorted(scene.objects, key=lambda o: o.y):
        _draw_object(draw, obj, size)
    return np.asarray(img, dtype=np.uint8)


def render_object_masks(scene: Scene, size: int) -> np.ndarray:
    """Which object each pixel of :func:`render_scene` shows: ``(size, size)`` int8, -1 for background, else the
    object's index in ``scene.objects`` (nearer objects cover farther ones, as drawn)."""
    sentinel = (1, 2, 3)  # a colour no drawing uses
    labels = np.full((size, size), -1, np.int8)
    order = sorted(range(len(scene.objects)), key=lambda k: scene.objects[k].y)
    for k in order:
        canvas = Image.new("RGB", (size, size), sentinel)
        _draw_object(ImageDraw.Draw(canvas), scene.objects[k], size)
        labels[np.any(np.asarray(canvas) != np.array(sentinel, np.uint8), axis=-1)] = k
    return labels


def low_level_maps(image: np.ndarray, grid: int) -> np.ndarray:
    """Local contrast energy and colour-opponent maps on a ``grid x grid`` lattice.

    Parameters
    ----------
    image : uint8 array of shape (H, W, 3)
    grid : int

    Returns
    -------
    maps : float32 array of shape (3, grid, grid)
        Channels as in :data:`LOW_LEVEL_CHANNELS`: gradient-magnitude energy of luminance,
        red-green and blue-yellow opponency (signed), each averaged over its cell.
    """
    work = 4 * grid
    small = np.asarray(Image.fromarray(image).resize((work, work), Image.BOX), dtype=np.float32) / 255.0
    lum = small @ np.array([0.299, 0.587, 0.114], np.float32)
    gy, gx = np.gradient(lum)
    energy = np.sqrt(gx**2 + gy**2) * work / 4
    rg = small[..., 0] - small[..., 1]
    by = small[..., 2] - 0.5 * (small[..., 0] + small[..., 1])
    stack = np.stack([energy, rg, by])
    return stack.reshape(3, grid, 4, grid, 4).mean(axis=(2, 4)).astype(np.float32)
