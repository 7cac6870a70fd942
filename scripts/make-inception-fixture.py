#!/usr/bin/env python3
"""Writes tests/fixtures/inception/expected.safetensors: pytorch-fid's InceptionV3 run on formula weights.

The real FID weights (pt_inception-2015-12-05-6726825d.pth) cannot be downloaded here and a
random-weight checkpoint would be ~95 MB, so both sides build the same pseudo-random weights and
inputs from a formula (tests/inception_parity.rs has the Rust twin of `formula` below):

  seed    = FNV-1a 64 of the tensor's name (UTF-8 bytes)
  z_i     = splitmix64 output i of that seed: mix(seed + (i + 1) * 0x9E3779B97F4A7C15)
  u_i     = (z_i >> 40) / 2**23 - 1                  uniform in [-1, 1), exact in f32
  value_i = f32(kind(u_i)), computed in f64:
      *.conv.weight       u * sqrt(6 / fan_in) * CONV_GAIN
      *.bn.weight         1 + 0.1 u
      *.bn.bias           0.1 u
      *.bn.running_mean   0.1 u
      *.bn.running_var    1 + 0.5 |u|
      fc.weight           u * sqrt(3 / 2048)
      fc.bias             0.1 u
      input.*             (u + 1) / 2               images in [0, 1)

pytorch-fid's `InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)`
is built unchanged, except that its download (`load_state_dict_from_url`) returns the formula
state dict; `load_state_dict` is strict, so the formula covers exactly pytorch-fid's keys. The
model then runs in float64 (`model.double()`), which gives the reference; the Rust side runs in
f32. pytorch-fid does not return the fc logits, so they are `pool @ fc.weight.T + fc.bias` here.

Written tensors (f32): `pool.<input>` (B, 2048) and `logits.<input>` (B, 1008) per input, and
`probe.<name>` (the first 16 formula values of a few tensors, so a formula mismatch shows up as
such). Metadata: the weight count and total element count (num_batches_tracked excluded).

Run (a venv with torch, torchvision, pytorch-fid, numpy, safetensors; no network needed):
    python3 -m venv /tmp/fid && /tmp/fid/bin/pip install torch torchvision pytorch-fid safetensors numpy
    /tmp/fid/bin/python scripts/make-inception-fixture.py
"""
import os
import time

import numpy as np
import torch
import torchvision
import pytorch_fid.inception as fid_inception
from safetensors.torch import save_file

CONV_GAIN = 1.1
# name -> shape (B, 3, H, W): a 299² image (no resize), a batch of two upsampled ones, a small
# one upsampled ~4.7x, and a non-square one downsampled along its width.
INPUTS = {
    "input.299": (1, 3, 299, 299),
    "input.256": (2, 3, 256, 256),
    "input.64": (1, 3, 64, 64),
    "input.200x341": (1, 3, 200, 341),
}
PROBES = ["Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var", "Mixed_6b.branch7x7_2.bn.running_var",
          "fc.weight", "input.64"]
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "inception")

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def fnv1a64(name):
    h = 0xCBF29CE484222325
    for byte in name.encode("utf-8"):
        h ^= byte
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def uniform(name, count):
    """u_i in [-1, 1) for i in 0..count, as float64 (each exactly an f32)."""
    with np.errstate(over="ignore"):
        i = np.arange(1, count + 1, dtype=np.uint64)
        z = np.uint64(fnv1a64(name)) + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) / 2.0**23 - 1.0


def formula(name, shape):
    """The formula tensor `name` of `shape`, as float32."""
    count = int(np.prod(shape))
    u = uniform(name, count)
    if name.startswith("input."):
        v = (u + 1.0) / 2.0
    elif name.endswith("conv.weight"):
        fan_in = int(np.prod(shape[1:]))
        v = u * (np.sqrt(6.0 / fan_in) * CONV_GAIN)
    elif name.endswith("bn.weight"):
        v = 1.0 + 0.1 * u
    elif name.endswith("bn.running_var"):
        v = 1.0 + 0.5 * np.abs(u)
    elif name.endswith(("bn.bias", "bn.running_mean", "fc.bias")):
        v = 0.1 * u
    elif name == "fc.weight":
        v = u * np.sqrt(3.0 / 2048.0)
    else:
        raise ValueError(f"no formula for {name}")
    return torch.from_numpy(v.astype(np.float32).reshape(shape))


def formula_state_dict():
    # pytorch-fid's FID blocks subclass torchvision's and keep their layers, so torchvision's
    # inception_v3 (1008 classes, no aux head) has the same keys and shapes.
    template = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    state = {}
    for name, tensor in template.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros((), dtype=torch.long)
        else:
            state[name] = formula(name, tuple(tensor.shape))
    return state


def main():
    state = formula_state_dict()
    fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
    model = fid_inception.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    model = model.double().eval()
    fc_weight, fc_bias = state["fc.weight"].double(), state["fc.bias"].double()

    # Activation scale per block, to check that the formula keeps values O(1) to the end.
    def report(module, _inputs, output):
        print(f"  {module.__class__.__name__:>18}: std {output.std().item():.3f} "
              f"mean {output.mean().item():.3f} zero {(output == 0).double().mean().item():.2f}")

    hooks = [m.register_forward_hook(report) for block in model.blocks for m in block]

    out = {}
    with torch.no_grad():
        for name, shape in INPUTS.items():
            images = formula(name, shape).double()
            start = time.time()
            print(f"{name} {shape}")
            pool = model(images)[0].flatten(1)
            logits = pool @ fc_weight.T + fc_bias
            print(f"  pool std {pool.std().item():.4f} max {pool.abs().max().item():.4f}; "
                  f"logits std {logits.std().item():.4f} max {logits.abs().max().item():.4f}; "
                  f"{time.time() - start:.1f} s")
            out[f"pool.{name}"] = pool.float().contiguous()
            out[f"logits.{name}"] = logits.float().contiguous()
            for h in hooks:
                h.remove()
            hooks = []
            # For reference: how far the same network in float32 lands from float64.
            model32 = model.float()
            pool32 = model32(images.float())[0].flatten(1).double()
            rel = ((pool32 - pool).abs().max() / pool.abs().max()).item()
            print(f"  torch float32 vs float64: pool max|d| {(pool32 - pool).abs().max().item():.2e} (rel {rel:.2e})")
            model = model32.double()

    for name in PROBES:
        source = state[name] if name in state else formula(name, INPUTS[name])
        out[f"probe.{name}"] = source.flatten()[:16].contiguous()
    weights = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    metadata = {
        "weight_tensors": str(len(weights)),
        "weight_elements": str(sum(v.numel() for v in weights.values())),
        "reference": f"pytorch-fid InceptionV3 float64, torch {torch.__version__}, torchvision {torchvision.__version__}",
    }
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "expected.safetensors")
    save_file(out, path, metadata=metadata)
    print(f"wrote {os.path.normpath(path)} ({os.path.getsize(path)} bytes), metadata {metadata}")


if __name__ == "__main__":
    main()
