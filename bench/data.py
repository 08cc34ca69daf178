"""Procedural videos of one moving shape, deterministic from a seed: the training data and the
ground truth of the reference DiTs (``bench/train.py``).

A video is one saturated shape moving over a desaturated background. Its *attributes* are the
condition the models learn to follow:

========== =====================================================================
shape      circle, square, triangle, cross
colour     red, yellow, green, cyan, blue, magenta (hues 60 degrees apart)
motion     translate (straight line), rotate (in place), scale (pulsing), bounce (off the walls)
background gradient (two grey tints), texture (stripes or checks of two grey tints)
========== =====================================================================

Everything else (position, speed, size, exact hue and tint, texture period) is drawn from the seed,
so ``video(seed)`` is the same tensor on every machine: the parameters come from Python's own
``random.Random`` (platform-independent) and the rendering is elementwise float32 arithmetic.

The foreground is saturated (HSV saturation >= 0.85) and the background is not (<= 0.2), which is
what lets ``foreground_hue`` read the colour back from a generated sample (the learning check).
"""
from __future__ import annotations

import colorsys
import math
import random
from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")
HUES = (0.0, 60.0, 120.0, 180.0, 240.0, 300.0)      # degrees, one per entry of COLOURS
MOTIONS = ("translate", "rotate", "scale", "bounce")
BACKGROUNDS = ("gradient", "texture")
#: Attribute name -> its values; the order is the order of the condition tokens.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": COLOURS, "motion": MOTIONS, "background": BACKGROUNDS}
N_CLASSES = math.prod(len(v) for v in ATTRIBUTES.values())

# Saturation bounds that separate foreground from background (see foreground_hue).
_FG_SATURATION = 0.85
_BG_SATURATION = 0.2


@dataclass(frozen=True)
class Condition:
    """The attributes of one video, as indices into the tuples of ``ATTRIBUTES``."""
    shape: int
    colour: int
    motion: int
    background: int

    @classmethod
    def from_label(cls, label: int) -> "Condition":
        """The condition whose flat class label (``0 <= label < N_CLASSES``) is ``label``."""
        if not 0 <= label < N_CLASSES:
            raise ValueError(f"class label {label} out of range [0, {N_CLASSES})")
        idx = []
        for values in reversed(ATTRIBUTES.values()):
            label, i = divmod(label, len(values))
            idx.append(i)
        return cls(*reversed(idx))

    @property
    def label(self) -> int:
        """Flat class label: mixed-radix number over the attributes, shape most significant."""
        out = 0
        for name, values in ATTRIBUTES.items():
            out = out * len(values) + getattr(self, name)
        return out

    def indices(self) -> list[int]:
        """Attribute indices in ``ATTRIBUTES`` order (what the condition embedding looks up)."""
        return [getattr(self, name) for name in ATTRIBUTES]

    def describe(self) -> str:
        return " ".join(ATTRIBUTES[name][getattr(self, name)] for name in ATTRIBUTES)


def random_condition(rng: random.Random) -> Condition:
    """A uniformly drawn condition."""
    return Condition(*(rng.randrange(len(v)) for v in ATTRIBUTES.values()))


def _rgb(h_deg: float, s: float, v: float) -> torch.Tensor:
    return torch.tensor(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), dtype=torch.float32)


def _background(kind: str, rng: random.Random, size: int) -> torch.Tensor:
    """[3, size, size] in [0, 1]: two grey tints (saturation <= _BG_SATURATION) as a linear
    gradient in a random direction, or as stripes / checks of a random period."""
    c0 = _rgb(rng.uniform(0, 360), rng.uniform(0, _BG_SATURATION), rng.uniform(0.15, 0.45))
    c1 = _rgb(rng.uniform(0, 360), rng.uniform(0, _BG_SATURATION), rng.uniform(0.5, 0.8))
    coord = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(coord, coord, indexing="ij")
    if kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        w = (x - 0.5) * math.cos(a) + (y - 0.5) * math.sin(a)
        w = (w - w.min()) / (w.max() - w.min())
    else:
        period = rng.choice((0.25, 0.375))           # in frame widths: 8 or 12 pixels at size 32
        if rng.random() < 0.5:
            a = rng.uniform(0, math.pi)
            w = (torch.sin(2 * math.pi * ((x * math.cos(a) + y * math.sin(a)) / period)) > 0).float()
        else:
            w = ((torch.floor(x / period) + torch.floor(y / period)) % 2).float()
    return c0[:, None, None] * (1 - w) + c1[:, None, None] * w


def _shape_sdf(kind: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of a unit-size shape at the origin, in shape coordinates."""
    if kind == "circle":
        return torch.sqrt(u * u + v * v) - 1.0
    if kind == "square":
        return torch.maximum(u.abs(), v.abs()) - 0.85
    if kind == "triangle":
        # Equilateral triangle pointing up (v grows downwards on screen), apex at v = -1, base at
        # v = 0.5: the max of the distances to its three edge lines (the two sides by symmetry).
        return torch.maximum(math.sqrt(3.0) / 2 * u.abs() - 0.5 * v - 0.5, v - 0.5)
    if kind == "cross":
        arm = 0.38
        bar_h = torch.maximum(u.abs() - 1.0, v.abs() - arm)
        bar_v = torch.maximum(u.abs() - arm, v.abs() - 1.0)
        return torch.minimum(bar_h, bar_v)
    raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")


def _trajectory(motion: str, rng: random.Random, frames: int, radius: float
                ) -> list[tuple[float, float, float, float]]:
    """(cx, cy, angle, scale) per frame, in units of the frame width; the shape stays inside."""
    lo, hi = radius + 0.02, 1.0 - radius - 0.02
    angle0 = rng.uniform(0, 2 * math.pi)
    out = []
    if motion == "translate":
        # Endpoints both inside, so the whole straight path is.
        x0, y0, x1, y1 = (rng.uniform(lo, hi) for _ in range(4))
        for f in range(frames):
            a = f / max(frames - 1, 1)
            out.append((x0 + (x1 - x0) * a, y0 + (y1 - y0) * a, angle0, 1.0))
    elif motion == "rotate":
        cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
        omega = rng.choice((-1, 1)) * rng.uniform(0.6, 1.2) * 2 * math.pi / frames   # ~1 turn/clip
        out = [(cx, cy, angle0 + omega * f, 1.0) for f in range(frames)]
    elif motion == "scale":
        cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
        phase = rng.uniform(0, 2 * math.pi)
        out = [(cx, cy, angle0, 0.75 + 0.25 * math.sin(phase + 2 * math.pi * f / frames))
               for f in range(frames)]
    elif motion == "bounce":
        # Fast enough to meet a wall within the clip; positions reflect off [lo, hi].
        x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
        speed = rng.uniform(1.0, 1.6) * (hi - lo) / frames * 2
        a = rng.uniform(0, 2 * math.pi)
        vx, vy = speed * math.cos(a), speed * math.sin(a)
        for _ in range(frames):
            out.append((x, y, angle0, 1.0))
            x, y = x + vx, y + vy
            if not lo <= x <= hi:
                vx, x = -vx, (2 * lo - x if x < lo else 2 * hi - x)
            if not lo <= y <= hi:
                vy, y = -vy, (2 * lo - y if y < lo else 2 * hi - y)
    else:
        raise ValueError(f"unknown motion {motion!r}; known: {MOTIONS}")
    return out


def video(seed: int, condition: Condition | None = None, frames: int = 8, size: int = 32
          ) -> tuple[torch.Tensor, Condition]:
    """One video ``[3, frames, size, size]`` in ``[-1, 1]`` and its condition.

    Deterministic in ``(seed, condition, frames, size)``. With ``condition=None`` the condition is
    drawn from the seed too (uniform over all ``N_CLASSES``)."""
    if frames < 1 or size < 8:
        raise ValueError(f"frames={frames}, size={size}: need frames >= 1 and size >= 8")
    rng = random.Random(seed)
    drawn = random_condition(rng)
    cond = condition if condition is not None else drawn
    bg = _background(BACKGROUNDS[cond.background], rng, size)
    fg = _rgb(HUES[cond.colour] + rng.uniform(-8, 8), rng.uniform(_FG_SATURATION, 1.0),
              rng.uniform(0.85, 1.0))
    radius = rng.uniform(0.16, 0.24)                    # in frame widths, at scale 1
    path = _trajectory(MOTIONS[cond.motion], rng, frames, radius)
    coord = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(coord, coord, indexing="ij")
    out = torch.empty(3, frames, size, size)
    for f, (cx, cy, angle, scale) in enumerate(path):
        r = radius * scale
        c, s = math.cos(angle), math.sin(angle)
        u = ((x - cx) * c + (y - cy) * s) / r
        v = (-(x - cx) * s + (y - cy) * c) / r
        # Anti-aliased edge about one pixel wide: sdf is in shape units, one pixel is 1/(size*r).
        alpha = torch.sigmoid(-_shape_sdf(SHAPES[cond.shape], u, v) * size * r * 2.0)
        out[:, f] = fg[:, None, None] * alpha + bg * (1 - alpha)
    return out * 2 - 1, cond


def batch(seeds: list[int], frames: int = 8, size: int = 32
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Videos ``[B, 3, frames, size, size]`` and attribute indices ``[B, len(ATTRIBUTES)]``."""
    vids, conds = zip(*(video(s, frames=frames, size=size) for s in seeds))
    return torch.stack(vids), torch.tensor([c.indices() for c in conds])


def foreground_hue(x: torch.Tensor) -> float | None:
    """Mean hue (degrees) of the saturated pixels of a video ``[3, F, H, W]`` in ``[-1, 1]``;
    None when fewer than 0.5% of the pixels are saturated (no foreground found).

    Saturated means HSV saturation above the midpoint of the background's maximum and the
    foreground's minimum, and value above 0.3 (dark pixels have unreliable hue). The mean is
    circular (hue is an angle)."""
    rgb = ((x.float() + 1) / 2).clamp(0, 1).reshape(3, -1)
    mx, mn = rgb.max(0).values, rgb.min(0).values
    sat = (mx - mn) / mx.clamp_min(1e-6)
    mask = (sat > (_FG_SATURATION + _BG_SATURATION) / 2) & (mx > 0.3)
    if int(mask.sum()) < 0.005 * mask.numel():
        return None
    r, g, b = rgb[:, mask]
    d = (mx - mn)[mask].clamp_min(1e-6)
    m = mx[mask]
    h = torch.where(m == r, ((g - b) / d) % 6, torch.where(m == g, (b - r) / d + 2, (r - g) / d + 4))
    ang = h * (math.pi / 3)
    return math.degrees(math.atan2(float(ang.sin().mean()), float(ang.cos().mean()))) % 360.0


def nearest_colour(hue: float | None) -> int | None:
    """Index into ``COLOURS`` of the palette hue closest (circularly) to ``hue``."""
    if hue is None:
        return None
    return min(range(len(HUES)), key=lambda i: min(abs(hue - HUES[i]), 360 - abs(hue - HUES[i])))
