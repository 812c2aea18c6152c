"""How a causal VAE codes the demo's colours in its latents: encodes bouncing clips of each
colour and compares, over the latent cells a shape covers (train_demo.shape_positions), the
mean latent of each colour.

    python tools/latent_geometry.py VAE_DIR [--clips 6] [--frames 81]

Latents are normalised per channel over all the clips (as the DiT sees them). Prints each
colour's mean norm, the cosines between the means and their distances divided by the spread
of a colour's own latents. When the colours lie along one direction (cosines near 1), a
latent's size is all that tells them apart, and a DiT that gets a shape's size or place
within a cell slightly wrong draws it in another colour. Needs torch and diffusers (the
golden venv); frame 0 is left out (the causal VAE codes it alone).
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_data as dd  # noqa: E402
import train_demo as T  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("vae")
    ap.add_argument("--clips", type=int, default=6, help="clips per colour")
    ap.add_argument("--frames", type=int, default=81)
    a = ap.parse_args()
    from diffusers import AutoencoderKLWan
    torch.set_grad_enabled(False)
    vae = T.load_f32(AutoencoderKLWan, a.vae)
    rng = np.random.default_rng(5)
    cols = list(dd.COLOURS)
    lat = {}
    for c in cols:
        clips = [dd.render_bouncing(c, dd.SHAPES[k % len(dd.SHAPES)], a.frames, rng) for k in range(a.clips)]
        lat[c] = vae.encode(T.to_tensor(np.stack(clips))).latent_dist.mean[:, :, 1:]
    every = torch.cat(list(lat.values()))
    mean = every.mean(dim=(0, 2, 3, 4)).view(1, -1, 1, 1, 1)
    std = every.std(dim=(0, 2, 3, 4)).view(1, -1, 1, 1, 1)
    cells = {}
    for c in cols:
        x = (lat[c] - mean) / std
        shape = T.shape_positions(x, 2.0)[:, 0] > 1.5
        cells[c] = x.permute(0, 2, 3, 4, 1)[shape]
    mu = torch.stack([cells[c].mean(0) for c in cols])
    spread = torch.stack([cells[c].var(0) for c in cols]).mean(0).sum().sqrt()
    unit = torch.nn.functional.normalize(mu, dim=1)
    cos, dist = unit @ unit.T, torch.cdist(mu, mu) / spread

    def table(name, m):
        print(f"{name:>22} " + " ".join(f"{c:>7}" for c in cols))
        for c, row in zip(cols, m.tolist()):
            print(f"{c:>22} " + " ".join(f"{v:7.2f}" for v in row))

    print(f"{'mean norm':>22} " + " ".join(f"{v:7.2f}" for v in mu.norm(dim=1).tolist()))
    print(f"{'own spread':>22} {spread.item():7.2f}")
    table("cosine", cos)
    table("distance / spread", dist)


if __name__ == "__main__":
    main()
