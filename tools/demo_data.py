#!/usr/bin/env python3
"""Procedural captioned clips for reel's embedded demo model (tools/train_demo.py).

Each clip is 17 frames of 64x64 RGB in [0, 1]: one coloured shape on a plain dark
background, moving in a straight line. The world:

    colours  red, green, blue, yellow
    shapes   circle, square, triangle
    motions  moving left, moving right, moving up, moving down

Start position and speed are random (the shape always stays inside the frame and travels
24-40 pixels as far as the frame allows, always more than a quarter of it); captions vary in wording ("a red circle
moving right", "red circle sliding to the right", ...). One colour-shape-motion
combination, HELD_OUT, never appears in training; it tests generalisation.

Everything is seeded: the same seed gives the same clips and captions.

    python3 tools/demo_data.py --preview /tmp/demo.png    # a grid of first/last frames
"""
import argparse
import math

import numpy as np

FRAMES, SIZE = 17, 64
BACKGROUND = (0.10, 0.10, 0.10)
COLOURS = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.12, 0.78, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.12),
}
SHAPES = ["circle", "square", "triangle"]
# The hue of each colour, by which the checks name a pixel's colour (as tests/cpu/demo.rs's
# colour_of does).
HUES = {"red": 0.0, "yellow": 52.0, "green": 128.0, "blue": 225.0}
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
HELD_OUT = ("blue", "triangle", "up")

TEMPLATES = [
    "a {c} {s} moving {m}",
    "{c} {s} moving {m}",
    "a {c} {s} going {m}",
    "the {c} {s} moves {m}",
    "a {c} {s} drifting {m}",
    "{c} {s} sliding {to}",
    "a {c} {s} sliding {to}",
]


def pixel_colours(px):
    """[..., 3] RGB in [0, 1] -> [...] index into HUES of each pixel's nearest hue, or -1 for
    pixels whose channels spread 0.3 or less (not saturated)."""
    px = np.asarray(px, dtype=float)
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    saturated = px.max(-1) - px.min(-1) > 0.3
    hue = np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360
    dist = np.stack([np.minimum(abs(hue - c), 360 - abs(hue - c)) for c in HUES.values()], -1)
    return np.where(saturated, dist.argmin(-1), -1)


def combos(include_held_out=False):
    out = [(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS]
    return out if include_held_out else [x for x in out if x != HELD_OUT]


def captions(colour, shape, motion):
    """Every wording of one combination."""
    to = f"to the {motion}" if motion in ("left", "right") else motion
    return [t.format(c=colour, s=shape, m=motion, to=to) for t in TEMPLATES]


def coverage(shape, cx, cy, r, xs, ys):
    """Anti-aliased coverage (0..1) of a shape of radius r centred at (cx, cy)."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        sd = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        sd = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    else:  # upward-pointing equilateral triangle with circumradius 1.4 r
        R = 1.4 * r
        sd = -np.inf * np.ones_like(dx)
        for k in range(3):
            a = math.pi / 2 + k * 2 * math.pi / 3  # normals of the three sides
            nx, ny = math.cos(a), -math.sin(a)
            sd = np.maximum(sd, -(nx * dx + ny * dy) - R / 2)
    return np.clip(0.5 - sd, 0.0, 1.0)


def render(colour, shape, motion, rng):
    """One clip [FRAMES, SIZE, SIZE, 3] float32 and its trajectory."""
    r = rng.uniform(6.5, 9.5)
    margin = r * 1.4 + 1.0  # the triangle's reach
    # 24-40 pixels over the clip, as far as the frame allows.
    speed = min(rng.uniform(1.5, 2.5), (SIZE - 2 * margin - 1) / (FRAMES - 1))  # pixels per frame
    travel = speed * (FRAMES - 1)
    ux, uy = MOTIONS[motion]

    def start(u):
        if u > 0:
            return rng.uniform(margin, SIZE - margin - travel)
        if u < 0:
            return rng.uniform(margin + travel, SIZE - margin)
        return rng.uniform(margin, SIZE - margin)

    x0, y0 = start(ux), start(uy)
    rgb = np.array(COLOURS[colour]) + rng.uniform(-0.05, 0.05, 3)
    rgb = np.clip(rgb, 0.0, 1.0)
    bg = np.array(BACKGROUND)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    clip = np.empty((FRAMES, SIZE, SIZE, 3), np.float32)
    for f in range(FRAMES):
        a = coverage(shape, x0 + ux * speed * f, y0 + uy * speed * f, r, xs, ys)[..., None]
        clip[f] = (a * rgb + (1 - a) * bg).astype(np.float32)
    return clip


BOUNCE_TEMPLATES = [
    "a {c} {s} bouncing",
    "{c} {s} bouncing",
    "a {c} {s} bouncing around",
    "the {c} {s} bounces off the edges",
    "a {c} {s} bouncing off the walls",
]


def bounce_captions(colour, shape):
    """Every wording of a bouncing clip."""
    return [t.format(c=colour, s=shape) for t in BOUNCE_TEMPLATES]


def render_bouncing(colour, shape, frames, rng):
    """A clip [frames, SIZE, SIZE, 3] float32 of a shape moving diagonally at a constant speed
    (1.5-2.5 pixels a frame) and bouncing off the edges of the frame (mirrored at the walls),
    for the block-causal demo: long enough (10 s and more) that it bounces many times."""
    r = rng.uniform(6.5, 9.5)
    margin = r * 1.4 + 1.0
    lo, hi = margin, SIZE - margin
    speed = rng.uniform(1.5, 2.5)
    angle = rng.uniform(math.radians(20), math.radians(70)) + (math.pi / 2) * rng.integers(4)
    vx, vy = speed * math.cos(angle), speed * math.sin(angle)
    x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
    rgb = np.clip(np.array(COLOURS[colour]) + rng.uniform(-0.05, 0.05, 3), 0.0, 1.0)
    bg = np.array(BACKGROUND)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    clip = np.empty((frames, SIZE, SIZE, 3), np.float32)
    for f in range(frames):
        a = coverage(shape, x, y, r, xs, ys)[..., None]
        clip[f] = (a * rgb + (1 - a) * bg).astype(np.float32)
        x, y = x + vx, y + vy
        if not lo <= x <= hi:
            x = 2 * (lo if x < lo else hi) - x
            vx = -vx
        if not lo <= y <= hi:
            y = 2 * (lo if y < lo else hi) - y
            vy = -vy
    return clip


def sample_bouncing(rng, frames):
    """A random bouncing clip of `frames` frames, its caption and its (colour, shape)."""
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    caps = bounce_captions(colour, shape)
    return render_bouncing(colour, shape, frames, rng), caps[rng.integers(len(caps))], (colour, shape)


def sample(rng, include_held_out=False):
    """A random clip, its caption and its (colour, shape, motion)."""
    pool = combos(include_held_out)
    combo = pool[rng.integers(len(pool))]
    caps = captions(*combo)
    return render(*combo, rng), caps[rng.integers(len(caps))], combo


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preview", help="write a PNG grid of first and last frames")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-n", type=int, default=12)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    rows = []
    for _ in range(a.n):
        clip, cap, _ = sample(rng)
        print(cap)
        rows.append(np.concatenate([clip[0], clip[FRAMES // 2], clip[-1]], axis=1))
    if a.preview:
        from PIL import Image
        grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
        Image.fromarray(grid).save(a.preview)
        print("wrote", a.preview)


if __name__ == "__main__":
    main()
