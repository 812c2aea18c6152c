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


# Text the tiny tokenizer is trained on: captions in the demo's small world plus other
# scripts, so that non-ASCII prompts have pieces of their own.
CORPUS = [
    "a red circle moving right", "a green square moving left", "a blue triangle moving up",
    "a yellow circle moving down", "red circle sliding to the right", "a cat on a sofa, cinematic lighting",
    "Ein roter Kreis bewegt sich nach rechts", "un cercle rouge qui glisse, très élégant",
    "un gato en un sofá", "一个红色的圆圈向右移动", "赤い円が右に動く", "빨간 원이 오른쪽으로 움직인다",
    "Tom & Jerry <3 \"cartoon\" 'classic' - numbers 0123456789 (parentheses) [brackets]",
    "café naïve façade déjà vu", "drone shot over a misty forest at dawn, 4k, slow motion",
]

# Prompts whose token ids must match transformers after prompt_clean: non-ASCII, curly
# quotes, repeated and Unicode spaces, HTML entities (single and double escaped),
# ligatures and full-width letters, combining accents, emoji, a very long and an empty one.
TOKENIZER_PROMPTS = [
    "a red circle moving right",
    "  A   red\tcircle\n\nmoving   right  ",
    "\u201cCurly quotes\u201d and \u2018single\u2019 ones \u2014 with an ellipsis\u2026",
    "Tom &amp; Jerry &lt;3 &quot;cartoon&quot; &#39;classic&#39; &amp;amp; double-escaped &eacute;",
    "Ein roter Kreis bewegt sich nach rechts, tr\u00e8s \u00e9l\u00e9gant",
    "\u4e00\u4e2a\u7ea2\u8272\u7684\u5706\u5708\u5411\u53f3\u79fb\u52a8",
    "\u8d64\u3044\u5186\u304c\u53f3\u306b\u52d5\u304f",
    "\ufb01ne ligatures and \uff26\uff35\uff2c\uff2c\uff37\uff29\uff24\uff34\uff28 letters\uff01",
    "cafe\u0301 with a combining accent",
    "a\u00a0red\u2003circle\u3000moving\u2028right\r\nnow",
    "a \U0001F431 cat \u2192 on a sofa",
    " ".join(["a red circle moving right"] * 150),
    "",
]


def text_cases(only):
    if not ("tokenizer".startswith(only) or "umt5".startswith(only) or only == ""):
        return
    import sentencepiece as spm
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    work = os.path.join(ROOT, "_spm_work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    with open(os.path.join(work, "corpus.txt"), "w") as f:
        f.write("\n".join(CORPUS * 20))
    spm.SentencePieceTrainer.train(
        input=os.path.join(work, "corpus.txt"), model_prefix=os.path.join(work, "spiece"), vocab_size=300,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        hard_vocab_limit=False, seed_sentencepiece_size=10000, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(work, "spiece.model"))
    tok = T5Tokenizer.from_pretrained(work, extra_ids=0)
    # T5TokenizerFast(vocab_file=...) silently builds a 4-entry vocabulary; from_pretrained
    # on a folder with spiece.model converts the real one. Check that it did.
    assert len(tok) == sp.get_piece_size(), (len(tok), sp.get_piece_size())
    for text in CORPUS:
        assert tok(text).input_ids == sp.encode(text) + [1], text
    vocab = len(tok)

    tdir = os.path.join(ROOT, "tokenizer")
    shutil.rmtree(tdir, ignore_errors=True)
    tok.save_pretrained(tdir)
    for f in os.listdir(tdir):
        if f != "tokenizer.json":
            os.remove(os.path.join(tdir, f))
    cases = []
    for p in TOKENIZER_PROMPTS:
        clean = prompt_clean(p)
        enc = tok(clean, padding="max_length", max_length=512, truncation=True, add_special_tokens=True,
                  return_attention_mask=True)
        n = sum(enc.attention_mask)
        assert enc.input_ids[n:] == [0] * (512 - n)
        cases.append({"prompt": p, "clean": clean, "ids": enc.input_ids[:n]})
    with open(os.path.join(tdir, "cases.json"), "w") as f:
        json.dump({"vocab_size": vocab, "max_length": 512, "cases": cases}, f, indent=1, ensure_ascii=False)
    shutil.rmtree(work)
    print(f"tokenizer: vocab {vocab}, {len(cases)} prompts")

    # name, config, sequence length, valid lengths per sample, ids from the tokenizer?
    te_cases = [
        ("umt5_a", dict(vocab_size=vocab, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128), 40, [40, 17], True),
        ("umt5_b", dict(vocab_size=vocab + 37, d_model=48, d_kv=16, num_heads=3, d_ff=80, num_layers=3,
                        relative_attention_num_buckets=16, relative_attention_max_distance=20), 50, [23, 50], False),
    ]
    for i, (name, cfg, length, valid, with_tokenizer) in enumerate(te_cases):
        gen = torch.Generator().manual_seed(2000 + i)
        torch.manual_seed(2000 + i)
        config = UMT5Config(feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, **cfg)
        model = UMT5EncoderModel(config).eval()
        perturb(model, gen, scale=0.2)
        case = os.path.join(ROOT, name)
        shutil.rmtree(case, ignore_errors=True)
        edir = os.path.join(case, "text_encoder")
        model.save_pretrained(edir, safe_serialization=True)
        components = {"text_encoder": ["transformers", "UMT5EncoderModel"]}
        if with_tokenizer:
            shutil.copytree(tdir, os.path.join(case, "tokenizer"), ignore=shutil.ignore_patterns("cases.json"))
            components["tokenizer"] = ["transformers", "T5TokenizerFast"]
        write_pipeline_root(case, components)
        ref = UMT5EncoderModel(config).to(torch.float64).eval()
        ref.load_state_dict(load_component_weights(edir, torch.float64), strict=False)
        ref.encoder.embed_tokens.weight = ref.shared.weight
        ids = torch.randint(3, cfg["vocab_size"], (2, length), generator=gen)
        mask = torch.zeros(2, length, dtype=torch.int64)
        for b, n in enumerate(valid):
            mask[b, :n] = 1
            ids[b, n - 1] = 1  # EOS
            ids[b, n:] = 0  # padding
        with torch.no_grad():
            out = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        rel = torch.arange(-600, 601)[None, :]
        buckets = ref.encoder.block[0].layer[0].SelfAttention._relative_position_bucket(rel)[0]
        save_file({"input_ids": ids, "attention_mask": mask}, os.path.join(case, "input.safetensors"))
        save_file({"last_hidden_state": out.contiguous(), "relative_position": rel[0].contiguous(),
                   "bucket": buckets.contiguous()}, os.path.join(case, "output.safetensors"))
        print(f"{name}: {list(out.shape)} |out| = {out.norm().item():.4f}")

        if with_tokenizer:
            # WanPipeline's prompt-embedding step, run by diffusers itself.
            from diffusers import WanPipeline
            pipe = WanPipeline(tokenizer=T5Tokenizer.from_pretrained(tdir), text_encoder=ref,
                               transformer=None, vae=None, scheduler=None)
            prompts = ["a red circle moving right", "\u201cCurly\u201d &amp; spaced   out"]
            with torch.no_grad():
                pe, ne = pipe.encode_prompt(prompts, negative_prompt=None, do_classifier_free_guidance=True,
                                            max_sequence_length=64, device="cpu", dtype=torch.float64)
            save_file({"prompt_embeds": pe.contiguous(), "negative_prompt_embeds": ne.contiguous()},
                      os.path.join(case, "prompt_embeds.safetensors"))
            with open(os.path.join(case, "prompts.json"), "w") as f:
                json.dump({"prompts": prompts, "negative_prompt": "", "max_sequence_length": 64}, f,
                          ensure_ascii=False)


# name, config, batch, latent (h, w), frame counts 1 + 4k
VAE_CASES = [
    ("vae_a", dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                   temperal_downsample=[False, True, True]), 1, (3, 5), [1, 5, 13]),
    ("vae_b", dict(base_dim=6, decoder_base_dim=10, z_dim=5, dim_mult=[1, 1, 2, 2], num_res_blocks=2,
                   attn_scales=[0.5], temperal_downsample=[True, True, False]), 2, (5, 3), [1, 5]),
]


def vae_cases(only):
    if not "vae".startswith(only) and only != "":
        return
    from diffusers import AutoencoderKLWan
    from diffusers.models.autoencoders import autoencoder_kl_wan as akw

    # diffusers 0.42.1 passes feat_cache/feat_idx to every encoder down block, and
    # WanAttentionBlock.forward does not take them: encoding with a non-empty attn_scales
    # raises TypeError. The block has no causal state, so the evident meaning (the one
    # reel implements) is to call it without the cache; patch that in for the reference.
    if not getattr(akw.WanAttentionBlock, "_reel_patched", False):
        plain = akw.WanAttentionBlock.forward
        akw.WanAttentionBlock.forward = lambda self, x, feat_cache=None, feat_idx=None: plain(self, x)
        akw.WanAttentionBlock._reel_patched = True

    for i, (name, cfg, batch, (lh, lw), frame_counts) in enumerate(VAE_CASES):
        gen = torch.Generator().manual_seed(3000 + i)
        torch.manual_seed(3000 + i)
        z = cfg["z_dim"]
        mean = (torch.randn(z, generator=gen) * 0.5).tolist()
        std = (torch.rand(z, generator=gen) + 0.5).tolist()
        model = AutoencoderKLWan(latents_mean=mean, latents_std=std, **cfg).eval()
        perturb(model, gen, scale=0.05)
        case = os.path.join(ROOT, name)
        shutil.rmtree(case, ignore_errors=True)
        vdir = os.path.join(case, "vae")
        model.save_pretrained(vdir, safe_serialization=True)
        write_pipeline_root(case, {"vae": ["diffusers", "AutoencoderKLWan"]})
        ref = AutoencoderKLWan(latents_mean=mean, latents_std=std, **cfg).to(torch.float64).eval()
        ref.load_state_dict(load_component_weights(vdir, torch.float64), strict=True)
        for frames in frame_counts:
            t = 1 + (frames - 1) // 4
            x = torch.rand(batch, 3, frames, lh * 8, lw * 8, generator=gen) * 2 - 1
            lat = torch.randn(batch, z, t, lh, lw, generator=gen)
            with torch.no_grad():
                mean_out = ref.encode(x.double()).latent_dist.mean
                dec = ref.decode(lat.double()).sample
            clamped = (dec.abs() >= 1.0).double().mean().item()
            save_file({"sample": x.contiguous(), "latents": lat.contiguous()},
                      os.path.join(case, f"input_f{frames}.safetensors"))
            save_file({"latent_mean": mean_out.contiguous(), "decoded": dec.contiguous()},
                      os.path.join(case, f"output_f{frames}.safetensors"))
            print(f"{name} F={frames}: latent_mean {list(mean_out.shape)}, decoded {list(dec.shape)}, "
                  f"clamped {clamped:.1%}")


def pipeline_cases(only):
    """A tiny WanPipeline (no text encoder) run by diffusers in float32 from given latents
    and prompt embeddings: 6 steps, guidance 5, shift 3, UniPC and flow-matching Euler,
    recording output_type "latent" and "pt"."""
    if not "pipeline".startswith(only) and only != "":
        return
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler,
                           WanPipeline, WanTransformer3DModel)

    gen = torch.Generator().manual_seed(4000)
    torch.manual_seed(4000)
    transformer = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=16,
                                        out_channels=16, text_dim=24, freq_dim=32, ffn_dim=64,
                                        num_layers=2).eval()
    perturb(transformer, gen, scale=0.05)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    perturb(vae, gen, scale=0.05)
    case = os.path.join(ROOT, "pipeline_tiny")
    shutil.rmtree(case, ignore_errors=True)
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                    num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=unipc)
    pipe.save_pretrained(case, safe_serialization=True)
    # 2 latent frames of 4x6 -> 5 frames of 32x48; batch 2 with two prompts.
    latents = torch.randn(2, 16, 2, 4, 6, generator=gen)
    embeds = torch.randn(2, 11, 24, generator=gen)
    embeds[0, 6:] = 0.0
    negative = torch.randn(2, 11, 24, generator=gen) * 0.5
    negative[:, 3:] = 0.0
    save_file({"latents": latents, "prompt_embeds": embeds, "negative_prompt_embeds": negative},
              os.path.join(case, "inputs.safetensors"))
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0, num_train_timesteps=1000)
    for name, sched in [("unipc", unipc), ("euler", euler)]:
        pipe.scheduler = sched
        out = {}
        for output_type in ["latent", "pt"]:
            with torch.no_grad():
                res = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents.clone(),
                           height=32, width=48, num_frames=5, num_inference_steps=6, guidance_scale=5.0,
                           output_type=output_type, return_dict=False)[0]
            out["latents" if output_type == "latent" else "video"] = res.contiguous().float()
        sched.set_timesteps(6)
        out["timesteps"] = sched.timesteps.to(torch.float64)
        out["sigmas"] = sched.sigmas.to(torch.float64)
        save_file(out, os.path.join(case, f"output_{name}.safetensors"))
        print(f"pipeline {name}: latents {list(out['latents'].shape)}, video {list(out['video'].shape)}, "
              f"timesteps {[round(float(t), 3) for t in out['timesteps']]}")


# Block-causal streaming (issue 19): a PyTorch reference written for reel, on diffusers'
# WanTransformer3DModel. Only two things differ from diffusers' forward: each block's
# self-attention attends to the cached K/V of earlier frames besides the chunk's own, and
# the RoPE positions are the chunk's absolute frame indices. The cache here keeps every
# frame and picks, for each chunk, the frames the window defines (the sink, then the latest
# ones that with the sink and the chunk fill local_attn_frames), so reel's evicting cache is
# checked against a definition, not against another cache.
CAUSAL_CASES = [
    # 5 chunks of 2 latent frames, a sink of 1 frame, 5 frames in all per chunk: from the
    # third chunk on, frames leave the window while frame 0 stays.
    ("causal_stream", dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                           text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2),
     dict(chunk_frames=2, sink_frames=1, local_attn_frames=5, denoising_steps=[1000.0, 750.0, 500.0],
          timestep_shift=3.0, context_timestep=50.0),
     [4, 10, 4, 6], 7),
    # Euler steps of the flow ODE per chunk, no sink (Self-Forcing's layout), 4 chunks of 3
    # frames with 6 attended: eviction from the third chunk on; batch-free text of 5 rows.
    ("causal_euler", dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                          text_dim=16, freq_dim=32, ffn_dim=48, num_layers=2),
     dict(chunk_frames=3, sink_frames=0, local_attn_frames=6, denoising_steps=[1000.0, 600.0, 200.0],
          timestep_shift=2.0, context_timestep=0.0, sampler="euler", guidance=3.0),
     [4, 12, 2, 4], 5),
    # A guidance scale per step (guidance_steps): the first step unguided (no negative pass),
    # the others at two scales; Euler steps, a sink of 1 and 5 frames attended, 4 chunks.
    ("causal_guided_steps", dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                                 text_dim=16, freq_dim=32, ffn_dim=48, num_layers=2),
     dict(chunk_frames=2, sink_frames=1, local_attn_frames=5, denoising_steps=[1000.0, 750.0, 500.0, 250.0],
          timestep_shift=3.0, context_timestep=0.0, sampler="euler", guidance=1.0,
          guidance_steps=[1.0, 4.0, 4.0, 2.0]),
     [4, 8, 2, 4], 5),
]


class _AbsoluteRope(torch.nn.Module):
    """diffusers' RoPE for the frames first_frame .. first_frame + F of a longer video."""

    def __init__(self, rope, patch_size):
        super().__init__()
        self.rope = rope
        self.patch_size = patch_size
        self.first_frame = 0

    def forward(self, hidden_states):
        b, c, f, h, w = hidden_states.shape
        longer = hidden_states.new_empty(b, c, self.first_frame + f, h, w)
        cos, sin = self.rope(longer)
        n = (f // self.patch_size[0]) * (h // self.patch_size[1]) * (w // self.patch_size[2])
        return cos[:, -n:], sin[:, -n:]


class _CachedSelfAttention:
    """WanAttnProcessor's self-attention over [cached K/V ; the chunk's K/V]."""

    def __init__(self):
        self.past = None      # (k, v) [B, Lc, heads, hd] of the attended earlier frames, or None
        self.collected = None  # the chunk's (k, v) when collecting

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))

        def rope(x, cos, sin):
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            c, s = cos[..., 0::2], sin[..., 1::2]
            return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)

        q, k = rope(q, *rotary_emb), rope(k, *rotary_emb)
        self.collected = (k, v)
        if self.past is not None:
            k = torch.cat([self.past[0], k], dim=1)
            v = torch.cat([self.past[1], v], dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](o))


def causal_cases(only):
    from diffusers import WanTransformer3DModel

    for i, (name, cfg, causal, lat, lt) in enumerate(CAUSAL_CASES):
        if not name.startswith(only):
            continue
        gen = torch.Generator().manual_seed(3000 + i)
        torch.manual_seed(3000 + i)
        model = WanTransformer3DModel(**cfg).eval()
        perturb(model, gen)
        case = os.path.join(ROOT, name)
        shutil.rmtree(case, ignore_errors=True)
        tdir = os.path.join(case, "transformer")
        os.makedirs(tdir)
        write_pipeline_root(case, {"transformer": ["diffusers", "WanTransformer3DModel"]})
        model.save_pretrained(tdir, safe_serialization=True)
        with open(os.path.join(tdir, "causal_config.json"), "w") as f:
            json.dump(causal, f, indent=2)
        model = WanTransformer3DModel(**cfg).to(torch.float64).eval()
        model.load_state_dict(load_component_weights(tdir, torch.float64), strict=True)
        rope = _AbsoluteRope(model.rope, model.config.patch_size)
        model.rope = rope
        procs = [_CachedSelfAttention() for _ in model.blocks]
        for blk, p in zip(model.blocks, procs):
            blk.attn1.set_processor(p)

        ch, frames, h, w = lat
        c, s, local = causal["chunk_frames"], causal["sink_frames"], causal["local_attn_frames"]
        chunks = frames // c
        shift = causal["timestep_shift"]
        sig = [shift * (t / 1000) / (1 + (shift - 1) * (t / 1000)) for t in causal["denoising_steps"]]
        steps = len(sig)
        text = torch.randn([1, lt, cfg["text_dim"]], generator=gen, dtype=torch.float32)
        noise = torch.randn([chunks, steps, 1, ch, c, h, w], generator=gen, dtype=torch.float32)
        # The scale of each step: guidance_steps, or guidance at every step.
        scales = causal.get("guidance_steps") or [causal.get("guidance", 1.0)] * steps
        negative = torch.randn([1, lt, cfg["text_dim"]], generator=gen, dtype=torch.float32)
        kv = {}  # frame -> per block (k, v) of that frame's tokens [1, tokens, heads, hd]
        tpf = (h // model.config.patch_size[1]) * (w // model.config.patch_size[2])
        out = []

        def run(x, t, f0, ctx=None):
            attended = [f for f in range(f0) if f < s or f >= f0 + c - (local - s)]
            for bi, p in enumerate(procs):
                if attended:
                    p.past = (torch.cat([kv[f][bi][0] for f in attended], dim=1),
                              torch.cat([kv[f][bi][1] for f in attended], dim=1))
                else:
                    p.past = None
            rope.first_frame = f0
            with torch.no_grad():
                return model(hidden_states=x, timestep=torch.tensor([t], dtype=torch.float64),
                             encoder_hidden_states=(text if ctx is None else ctx).double(),
                             return_dict=False)[0]

        def flow_at(x, t, f0, g):
            # Guidance: u + g (c - u), the negative prompt over the same cache (the cache
            # itself is filled with the prompt only).
            cond = run(x, t, f0)
            if g <= 1.0:
                return cond
            u = run(x, t, f0, negative)
            return u + g * (cond - u)

        for k in range(chunks):
            f0 = k * c
            x = noise[k, 0].double()
            for j, sg in enumerate(sig):
                flow = flow_at(x, sg * 1000, f0, scales[j])
                if causal.get("sampler") == "euler":
                    x = x + ((sig[j + 1] if j + 1 < steps else 0.0) - sg) * flow
                    x0 = x
                    continue
                x0 = x - sg * flow
                if j + 1 < steps:
                    x = (1 - sig[j + 1]) * x0 + sig[j + 1] * noise[k, j + 1].double()
            out.append(x0)
            if k + 1 < chunks:
                run(x0, causal["context_timestep"], f0)
                for fi in range(c):
                    kv[f0 + fi] = [(p.collected[0][:, fi * tpf:(fi + 1) * tpf],
                                    p.collected[1][:, fi * tpf:(fi + 1) * tpf]) for p in procs]
        latents = torch.cat(out, dim=2)
        inputs = {"encoder_hidden_states": text.contiguous(), "noise": noise.contiguous()}
        if max(scales) > 1.0:
            inputs["negative_encoder_hidden_states"] = negative.contiguous()
        save_file(inputs, os.path.join(case, "input.safetensors"))
        save_file({"latents": latents.contiguous()}, os.path.join(case, "output.safetensors"))
        print(f"{name}: {list(latents.shape)} |latents| = {latents.norm().item():.4f}")


# Wan's original key layout (as Self-Forcing / LongLive checkpoints name a model) from a
# diffusers name. Written here from the two models' module trees; `reel convert` maps back.
def _wan_original_name(name):
    import re
    top = {
        "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
        "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
        "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
        "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
        "condition_embedder.time_proj.": "time_projection.1.",
        "proj_out.": "head.head.",
        "patch_embedding.": "patch_embedding.",
    }
    if name == "scale_shift_table":
        return "head.modulation"
    for a, b in top.items():
        if name.startswith(a):
            return b + name[len(a):]
    m = re.match(r"blocks\.(\d+)\.(.*)$", name)
    assert m, name
    n, rest = m.groups()
    block = {
        "scale_shift_table": "modulation",
        "attn1.to_q.": "self_attn.q.", "attn1.to_k.": "self_attn.k.", "attn1.to_v.": "self_attn.v.",
        "attn1.to_out.0.": "self_attn.o.", "attn1.norm_q.": "self_attn.norm_q.",
        "attn1.norm_k.": "self_attn.norm_k.",
        "attn2.to_q.": "cross_attn.q.", "attn2.to_k.": "cross_attn.k.", "attn2.to_v.": "cross_attn.v.",
        "attn2.to_out.0.": "cross_attn.o.", "attn2.norm_q.": "cross_attn.norm_q.",
        "attn2.norm_k.": "cross_attn.norm_k.",
        "norm2.": "norm3.",  # the affine norm before cross-attention
        "ffn.net.0.proj.": "ffn.0.", "ffn.net.2.": "ffn.2.",
    }
    for a, b in block.items():
        if rest == a or rest.startswith(a):
            return f"blocks.{n}." + b + rest[len(a):]
    raise KeyError(name)


# The LoRA targets of LongLive: every linear layer of every block.
_LORA_TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]


def convert_cases(only):
    """A tiny DiT in Wan's original layout, saved as LongLive saves its training state (a .pt of
    {"generator": {"model." + key: ...}}) plus a rank-4 LoRA in peft's layout
    ({"generator_lora": {"base_model.model.<key>.lora_A.weight": ...}}), both turned into
    safetensors by tools/pt_to_safetensors.py. The reference: diffusers' model with the merged
    weights W + scale·B·A, its forward on a stored input."""
    if not "convert_wan".startswith(only) and not only == "":
        return
    import subprocess
    import tempfile
    from diffusers import WanTransformer3DModel

    cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
               text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2)
    scale = 0.75
    gen = torch.Generator().manual_seed(4000)
    torch.manual_seed(4000)
    model = WanTransformer3DModel(**cfg).eval()
    perturb(model, gen)
    case = os.path.join(ROOT, "convert_wan")
    shutil.rmtree(case, ignore_errors=True)
    os.makedirs(case)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    original = {"model." + _wan_original_name(k): v for k, v in sd.items()}
    lora = {}
    rank = 4
    for n in range(cfg["num_layers"]):
        for t in _LORA_TARGETS:
            w = original[f"model.blocks.{n}.{t}.weight"]
            a = torch.randn([rank, w.shape[1]], generator=gen) * 0.2
            b = torch.randn([w.shape[0], rank], generator=gen) * 0.2
            lora[f"base_model.model.blocks.{n}.{t}.lora_A.weight"] = a.to(torch.bfloat16)
            lora[f"base_model.model.blocks.{n}.{t}.lora_B.weight"] = b.to(torch.bfloat16)
    tools = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"generator": original, "step": 7}, os.path.join(tmp, "base.pt"))
        torch.save({"generator_lora": lora, "critic_lora": {}, "step": 7}, os.path.join(tmp, "lora.pt"))
        for stem in ["base", "lora"]:
            subprocess.run([sys.executable, os.path.join(tools, "pt_to_safetensors.py"),
                            os.path.join(tmp, stem + ".pt"), os.path.join(case, stem + ".safetensors")],
                           check=True)
    # The merged model in diffusers' layout, in float64 from the stored bf16 tensors.
    merged = {k: v.double() for k, v in sd.items()}
    inverse = {_wan_original_name(k): k for k in sd}
    for n in range(cfg["num_layers"]):
        for t in _LORA_TARGETS:
            a = lora[f"base_model.model.blocks.{n}.{t}.lora_A.weight"].double()
            b = lora[f"base_model.model.blocks.{n}.{t}.lora_B.weight"].double()
            merged[inverse[f"blocks.{n}.{t}.weight"]] += scale * (b @ a)
    ref = WanTransformer3DModel(**cfg).to(torch.float64).eval()
    ref.load_state_dict(merged, strict=True)
    x = torch.randn([1, 4, 3, 4, 6], generator=gen)
    t = torch.tensor([500.0])
    ctx = torch.randn([1, 5, cfg["text_dim"]], generator=gen)
    with torch.no_grad():
        out = ref(hidden_states=x.double(), timestep=t.double(), encoder_hidden_states=ctx.double(),
                  return_dict=False)[0]
    save_file({"hidden_states": x.contiguous(), "timestep": t, "encoder_hidden_states": ctx.contiguous()},
              os.path.join(case, "input.safetensors"))
    save_file({"sample": out.contiguous()}, os.path.join(case, "output.safetensors"))
    with open(os.path.join(case, "convert.json"), "w") as f:
        json.dump({"lora_scale": scale, "num_attention_heads": cfg["num_attention_heads"]}, f)
    print(f"convert_wan: {len(original)} tensors, {len(lora)} LoRA tensors, |out| = {out.norm().item():.4f}")


def main():
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    torch.set_num_threads(2)
    dit_cases(only)
    embedding_cases(only)
    text_cases(only)
    vae_cases(only)
    pipeline_cases(only)
    causal_cases(only)
    convert_cases(only)


if __name__ == "__main__":
    main()
