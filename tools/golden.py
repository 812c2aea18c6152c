#!/usr/bin/env python3
"""Golden data for reel's parity tests, computed by diffusers/transformers (never by reel).

Builds tiny random models in the diffusers layout, runs them in float64 and writes
inputs, weights and references under tests/data/<case>/. Seeded: a rerun reproduces the
same files bit for bit on the same library versions.

    python3 -m venv /tmp/reel-golden
    /tmp/reel-golden/bin/pip install -r tools/requirements-golden.txt
    /tmp/reel-golden/bin/python tools/golden.py            # all cases
    /tmp/reel-golden/bin/python tools/golden.py dit        # cases whose name starts with dit

Layout of a DiT case (a pipeline root, so both --model forms are exercised):
    tests/data/dit_<name>/model_index.json
    tests/data/dit_<name>/transformer/config.json + weights (F32, BF16, or sharded)
    tests/data/dit_<name>/input.safetensors   hidden_states, timestep, encoder_hidden_states (F32)
    tests/data/dit_<name>/output.safetensors  sample (F64)
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data")


def perturb(module, gen, scale=0.1):
    """Moves every parameter off its init (norm weights of 1, zero biases) so that each
    tensor matters to the output and a mix-up of two tensors cannot go unnoticed."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)


def load_component_weights(folder, dtype):
    """Every tensor of a component folder's safetensors files (shards included), as dtype."""
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(folder, f)))
    return {k: v.to(dtype) for k, v in sd.items()}


def write_pipeline_root(case_dir, components):
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.42.1"}
    index.update(components)
    with open(os.path.join(case_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)


# name, config overrides, latent shape [B, C, T, H, W], text length, timesteps, storage
DIT_CASES = [
    # odd T/H/W, head_dim 16, sharded F32 weights
    ("dit_odd", dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                     text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2),
     [1, 4, 3, 6, 10], 7, [631.0], "sharded"),
    # non-square, batch 2 with different timesteps, head_dim 24, BF16 weights,
    # zero-padded text rows as the pipeline makes them
    ("dit_batch2", dict(num_attention_heads=3, attention_head_dim=24, in_channels=16, out_channels=16,
                        text_dim=40, freq_dim=64, ffn_dim=96, num_layers=2),
     [2, 16, 5, 4, 12], 9, [999.0, 417.5], "bf16"),
    # head_dim 48, no cross-attention norm, patch (1, 2, 2), F32
    ("dit_hd48", dict(num_attention_heads=2, attention_head_dim=48, in_channels=16, out_channels=16,
                      text_dim=32, freq_dim=256, ffn_dim=160, num_layers=1, cross_attn_norm=False),
     [1, 16, 1, 6, 8], 5, [1.0], "f32"),
    # the real head_dim 128 (one head), F32
    ("dit_hd128", dict(num_attention_heads=1, attention_head_dim=128, in_channels=16, out_channels=16,
                       text_dim=32, freq_dim=256, ffn_dim=256, num_layers=1),
     [1, 16, 3, 4, 6], 6, [250.0], "f32"),
    # temporal patch 2 and out_channels != in_channels
    ("dit_patch222", dict(num_attention_heads=2, attention_head_dim=12, in_channels=6, out_channels=3,
                          text_dim=16, freq_dim=16, ffn_dim=48, num_layers=1, patch_size=(2, 2, 2)),
     [1, 6, 4, 4, 6], 3, [42.0], "f32"),
]


def dit_cases(only):
    from diffusers import WanTransformer3DModel

    for i, (name, cfg, shape, lt, ts, storage) in enumerate(DIT_CASES):
        if not name.startswith(only):
            continue
        gen = torch.Generator().manual_seed(1000 + i)
        torch.manual_seed(1000 + i)
        model = WanTransformer3DModel(**cfg).eval()
        perturb(model, gen)
        case = os.path.join(ROOT, name)
        shutil.rmtree(case, ignore_errors=True)
        tdir = os.path.join(case, "transformer")
        os.makedirs(tdir)
        write_pipeline_root(case, {"transformer": ["diffusers", "WanTransformer3DModel"]})
        if storage == "bf16":
            model = model.to(torch.bfloat16)
            model.save_pretrained(tdir, safe_serialization=True)
        elif storage == "sharded":
            model.save_pretrained(tdir, safe_serialization=True, max_shard_size="40KB")
        else:
            model.save_pretrained(tdir, safe_serialization=True)
        # The reference runs on exactly the stored weights, widened to float64.
        model = WanTransformer3DModel(**cfg).to(torch.float64).eval()
        model.load_state_dict(load_component_weights(tdir, torch.float64), strict=True)

        b = shape[0]
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        t = torch.tensor(ts, dtype=torch.float32)
        ctx = torch.randn([b, lt, cfg["text_dim"]], generator=gen, dtype=torch.float32)
        if name == "dit_batch2":
            ctx[0, 5:] = 0.0  # first prompt has 5 tokens, then zero padding
            ctx[1, 7:] = 0.0
        with torch.no_grad():
            out = model(hidden_states=x.double(), timestep=t.double(),
                        encoder_hidden_states=ctx.double(), return_dict=False)[0]
        save_file({"hidden_states": x.contiguous(), "timestep": t, "encoder_hidden_states": ctx.contiguous()},
                  os.path.join(case, "input.safetensors"))
        save_file({"sample": out.contiguous()}, os.path.join(case, "output.safetensors"))
        print(f"{name}: {list(out.shape)} |out| = {out.norm().item():.4f}")


def embedding_cases(only):
    """RoPE tables and timestep embeddings straight from diffusers' modules."""
    if not "embeddings".startswith(only) and not only == "":
        return
    from diffusers.models.embeddings import Timesteps
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    out = {}
    for hd, grid in [(128, (3, 5, 9)), (24, (3, 7, 4)), (16, (2, 3, 5))]:
        rope = WanRotaryPosEmbed(hd, (1, 2, 2), 1024)
        x = torch.zeros(1, 16, grid[0], grid[1] * 2, grid[2] * 2)
        cos, sin = rope(x)  # [1, L, 1, hd] float32
        out[f"rope_cos_{hd}"] = cos.reshape(-1, hd).contiguous()
        out[f"rope_sin_{hd}"] = sin.reshape(-1, hd).contiguous()
        out[f"rope_grid_{hd}"] = torch.tensor(grid, dtype=torch.int64)
    t = torch.tensor([0.0, 1.0, 17.5, 500.0, 999.0, 999.99], dtype=torch.float32)
    out["timesteps"] = t
    for dim in (256, 32):
        out[f"timestep_embedding_{dim}"] = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)(t).contiguous()
    os.makedirs(os.path.join(ROOT, "embeddings"), exist_ok=True)
    save_file(out, os.path.join(ROOT, "embeddings", "embeddings.safetensors"))
    print("embeddings: rope tables for head_dim 128/24/16, timestep embeddings 256/32")


def main():
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    torch.set_num_threads(2)
    dit_cases(only)
    embedding_cases(only)


if __name__ == "__main__":
    main()
