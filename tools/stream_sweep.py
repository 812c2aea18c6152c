"""The README's streaming sweep: `reel generate --stream` for each colour-shape prompt of the
demo, every 4th frame checked for a shape of the prompt's colour.

    python tools/stream_sweep.py target/release/reel [--seconds 60] [--seed 0]
        [--model DIR --size 64x64] [PROMPT ...]

A frame is right when at least 20 of its pixels have the prompt's colour and no other demo
colour has more. A pixel's colour is the demo hue nearest its own, for pixels whose
channels spread more than 0.3 (demo_data.pixel_colours, as tests/cpu/demo.rs's
colour_of). Prints, per prompt, the share of right frames, the median of the prompt
colour's pixels on them (the training clips' shapes have 140-270 of a 64x64 frame's 4096)
and how the others go wrong (another colour, or faint: fewer than 20 pixels of any). Then three
checks of the drawing over time, which the colour does not see: "one shape", the share of
the checked frames whose coloured pixels (any demo colour) form exactly one patch of at least
15 pixels (4-connected; the training clips: every frame), and "step p95", the 95th
percentile of how far the coloured pixels' centroid moves from one frame to the next (the
clips: 1.8-2.8 pixels; a shape that vanishes and reappears elsewhere makes it large), and
"slow": of the seconds whose five checked frames are all right, those in which the prompt
colour's centroid travels less than 8 pixels (the minute test's motion rule, on the sweep's
right frames). With more than one prompt, a last line: the means of the shares, the worst
prompt's colour, the range of step p95 and the slow seconds of all.
Needs numpy only; writes the videos (y4m) to a temporary folder.
"""
import argparse
import os
import subprocess
import sys
import tempfile
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_data import HUES, SHAPES, pixel_colours  # noqa: E402


def y4m_frames(path):
    """A 4:4:4 y4m as reel writes it -> [F, H, W, 3] RGB in [0, 1] (BT.601, full range)."""
    data = open(path, "rb").read()
    end = data.index(b"\n")
    head = data[:end].decode().split()
    w = int(next(p for p in head if p[0] == "W")[1:])
    h = int(next(p for p in head if p[0] == "H")[1:])
    i, out, n = end + 1, [], w * h
    while i < len(data):
        i = data.index(b"\n", i) + 1  # FRAME
        y, u, v = (np.frombuffer(data[i + k * n:i + (k + 1) * n], np.uint8).reshape(h, w).astype(float)
                   for k in range(3))
        i += 3 * n
        rgb = np.stack([y + 1.402 * (v - 128), y - 0.344 * (u - 128) - 0.714 * (v - 128), y + 1.772 * (u - 128)], -1)
        out.append(rgb.clip(0, 255) / 255)
    return out


def pixel_counts(nearest):
    """Pixels of each demo colour (HUES' order) in a frame's pixel_colours."""
    return [int((nearest == k).sum()) for k in range(len(HUES))]


def patch_sizes(mask):
    """Pixels of each 4-connected patch of a boolean [H, W] mask: every pixel takes the
    largest label among itself and its neighbours until nothing changes."""
    lab = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        p = np.pad(lab, 1)
        new = np.where(mask, np.maximum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]), 0)
        if (new == lab).all():
            return np.unique(lab[mask], return_counts=True)[1]
        lab = new


def centroid(mask):
    """(y, x) of a boolean [H, W] mask's pixels, or None when it has none."""
    ys, xs = np.nonzero(mask)
    return (ys.mean(), xs.mean()) if len(ys) else None


def centroid_steps(colours):
    """How far the centroid of the coloured pixels moves between consecutive frames that both
    have some (each frame given as its pixel_colours)."""
    points = [centroid(nearest >= 0) for nearest in colours]
    return [np.hypot(a[0] - b[0], a[1] - b[1]) for a, b in zip(points, points[1:]) if a and b]


def slow_seconds(colours, right, k):
    """Seconds (five checked frames, all right, from the 4th frame on) in which the centroid of
    colour k's pixels travels less than 8 pixels along the checked frames: tests/cpu/demo.rs's
    motion rule for the minute test (the clips move 24-40 pixels a second), on this sweep's
    right frames (the test's need 40 pixels of the colour, not 20), which all have a centroid.
    -> (slow, all)."""
    points = [centroid(nearest == k) for nearest in colours]
    slow = seconds = 0
    for s in range(0, len(colours) - 4, 4):
        if all(right[s:s + 5]):
            seconds += 1
            path = sum(np.hypot(b[0] - a[0], b[1] - a[1]) for a, b in zip(points[s:s + 4], points[s + 1:s + 5]))
            slow += int(path < 8)
    return slow, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reel")
    ap.add_argument("prompts", nargs="*")
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="a block-causal model folder (default: the embedded variant)")
    ap.add_argument("--size", default="64x64")
    a = ap.parse_intermixed_args()
    prompts = a.prompts or [f"a {c} {s} bouncing" for c in HUES for s in SHAPES]
    names = list(HUES)
    shares, singles, p95s, slows = [], [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for prompt in prompts:
            colour = next(c for c in HUES if c in prompt.split())
            out = os.path.join(tmp, "v.y4m")
            model = ["--model", a.model, "--size", a.size] if a.model else []
            subprocess.run([a.reel, "generate", *model, "--stream", "--seconds", str(a.seconds), "--seed",
                            str(a.seed), "--prompt", prompt, "-o", out, "--quiet"], check=True,
                           stdout=subprocess.DEVNULL)
            kinds, sizes, single, right = Counter(), [], 0, []
            k = names.index(colour)
            colours = [pixel_colours(frame) for frame in y4m_frames(out)]
            for nearest in colours[::4]:
                single += int((patch_sizes(nearest >= 0) >= 15).sum() == 1)
                counts = pixel_counts(nearest)
                right.append(counts[k] >= 20 and counts[k] == max(counts))
                if right[-1]:
                    kinds["right"] += 1
                    sizes.append(counts[k])
                elif max(counts) < 20:
                    kinds["faint"] += 1
                else:
                    kinds[names[int(np.argmax(counts))]] += 1
            total = sum(kinds.values())
            wrong = ", ".join(f"{k} {v}" for k, v in kinds.items() if k != "right")
            size = f"  median {int(np.median(sizes))} px" if sizes else ""
            steps = centroid_steps(colours)
            p95 = np.percentile(steps, 95) if steps else None
            step = f"{p95:5.1f} px" if steps else "    -"
            slow, seconds = slow_seconds(colours[4::4], right[1:], k)
            print(f"{prompt:32} right {kinds['right'] / total:6.1%} of {total}{size}  one shape {single / total:6.1%}"
                  f"  step p95 {step}  slow {slow:2}/{seconds} s  ({wrong or 'none wrong'})", flush=True)
            shares.append(kinds["right"] / total)
            singles.append(single / total)
            p95s += [p95] if steps else []
            slows += slow
    if len(prompts) > 1:
        span = f"{min(p95s):.1f}-{max(p95s):.1f} px" if p95s else "-"
        print(f"{'all ' + str(len(prompts)) + ' prompts':32} right {np.mean(shares):6.1%} (worst {min(shares):.1%})"
              f"  one shape {np.mean(singles):6.1%}  step p95 {span}  slow {slows} s")


if __name__ == "__main__":
    main()
