#!/usr/bin/env python3
"""A PyTorch checkpoint (.pt / .pth state dict) to safetensors, for `reel convert`.

The block-causal Wan checkpoints are pickled training states: Self-Forcing's hold
{"generator": ..., "generator_ema": ..., "critic": ...}, LongLive's base model
{"generator": ...} and its LoRA {"generator_lora": ..., "critic_lora": ...}. This picks one
state dict, drops FSDP's `_fsdp_wrapped_module.` from its keys and writes its tensors
(contiguous, dtypes kept) to a .safetensors file. Only this step needs torch:

    python3 -m venv /tmp/reel-torch && /tmp/reel-torch/bin/pip install torch safetensors
    /tmp/reel-torch/bin/python tools/pt_to_safetensors.py longlive_base.pt base.safetensors
    /tmp/reel-torch/bin/python tools/pt_to_safetensors.py lora.pt lora.safetensors
    /tmp/reel-torch/bin/python tools/pt_to_safetensors.py self_forcing_dmd.pt sf.safetensors --key generator_ema

The default --key is the first of generator_ema, generator, generator_lora, model,
state_dict that the file has, or the whole file when it is a flat state dict. The file is
loaded with weights_only=True: nothing in it is executed.
"""
import argparse
import sys

import torch
from safetensors.torch import save_file

DEFAULT_KEYS = ["generator_ema", "generator", "generator_lora", "model", "state_dict"]


def pick(obj, key):
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            have = sorted(obj.keys()) if isinstance(obj, dict) else type(obj).__name__
            sys.exit(f"--key {key}: not in the checkpoint (it has {have})")
        return key, obj[key]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None, obj
    for k in DEFAULT_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(k), dict):
            return k, obj[k]
    have = sorted(obj.keys()) if isinstance(obj, dict) else type(obj).__name__
    sys.exit(f"no state dict found (keys: {have}); name one with --key")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help=".pt / .pth checkpoint")
    ap.add_argument("output", help=".safetensors to write")
    ap.add_argument("--key", help="which state dict of the checkpoint (default: see above)")
    args = ap.parse_args()
    obj = torch.load(args.input, map_location="cpu", weights_only=True)
    key, sd = pick(obj, args.key)
    out = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            sys.exit(f"`{name}` is a {type(t).__name__}, not a tensor")
        name = name.replace("_fsdp_wrapped_module.", "")
        if name in out:
            sys.exit(f"`{name}` twice once FSDP's prefixes are dropped")
        # A copy of its own: tensors of a training state may be views into one flat buffer.
        out[name] = t.detach().clone().contiguous()
    save_file(out, args.output)
    print(f"{args.output}: {len(out)} tensors from {args.input}" + (f" [{key}]" if key else ""))


if __name__ == "__main__":
    main()
