#!/usr/bin/env python3
"""Writes tests/fixtures/vq16_tiny.{pt,safetensors} and vq16_tiny_expected.safetensors.

A miniature of LlamaGen's VQ-16 with the same key layout (ch_mult [1, 1, 2, 2, 4], 2 ResNet
blocks per level, attention at the lowest level, mid = res/attn/res), but 4 base channels, 4
GroupNorm groups, z_channels 8 and a 16-entry codebook, so the files are a few hundred KB.
The state dict is saved both as a PyTorch checkpoint ({"model": state_dict}, like LlamaGen's
released .pt) and as safetensors. An independent torch.nn.functional forward pass, written from
the architecture description in the DPAR design §2, gives the expected codes and decoded pixels for
a fixed input, which the Rust test compares against.

Needs torch (and the `safetensors` package): python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch safetensors
"""
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

CH, MULT, NRES, Z, V, CD, GROUPS, SIZE = 4, [1, 1, 2, 2, 4], 2, 8, 16, 8, 4, 32
torch.manual_seed(0)
sd = {}


def conv(name, cin, cout, k):
    sd[f"{name}.weight"] = torch.randn(cout, cin, k, k) * (1.0 / (cin * k * k) ** 0.5)
    sd[f"{name}.bias"] = torch.randn(cout) * 0.05


def norm(name, c):
    sd[f"{name}.weight"] = 1.0 + 0.1 * torch.randn(c)
    sd[f"{name}.bias"] = 0.1 * torch.randn(c)


def res(name, cin, cout):
    norm(f"{name}.norm1", cin)
    conv(f"{name}.conv1", cin, cout, 3)
    norm(f"{name}.norm2", cout)
    conv(f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        conv(f"{name}.nin_shortcut", cin, cout, 1)


def attn(name, c):
    norm(f"{name}.norm", c)
    for p in ["q", "k", "v", "proj_out"]:
        conv(f"{name}.{p}", c, c, 1)


# Encoder.
conv("encoder.conv_in", 3, CH, 3)
block_in = CH
for i, m in enumerate(MULT):
    for j in range(NRES):
        res(f"encoder.conv_blocks.{i}.res.{j}", block_in, CH * m)
        block_in = CH * m
        if i == len(MULT) - 1:
            attn(f"encoder.conv_blocks.{i}.attn.{j}", block_in)
    if i != len(MULT) - 1:
        conv(f"encoder.conv_blocks.{i}.downsample.conv", block_in, block_in, 3)
res("encoder.mid.0", block_in, block_in)
attn("encoder.mid.1", block_in)
res("encoder.mid.2", block_in, block_in)
norm("encoder.norm_out", block_in)
conv("encoder.conv_out", block_in, Z, 3)
# Decoder: conv_blocks.0 is the lowest resolution.
block_in = CH * MULT[-1]
conv("decoder.conv_in", Z, block_in, 3)
res("decoder.mid.0", block_in, block_in)
attn("decoder.mid.1", block_in)
res("decoder.mid.2", block_in, block_in)
for i, m in enumerate(reversed(MULT)):
    for j in range(NRES + 1):
        res(f"decoder.conv_blocks.{i}.res.{j}", block_in, CH * m)
        block_in = CH * m
        if i == 0:
            attn(f"decoder.conv_blocks.{i}.attn.{j}", block_in)
    if i != len(MULT) - 1:
        conv(f"decoder.conv_blocks.{i}.upsample.conv", block_in, block_in, 3)
norm("decoder.norm_out", block_in)
conv("decoder.conv_out", block_in, 3, 3)
conv("quant_conv", Z, CD, 1)
conv("post_quant_conv", CD, Z, 1)
sd["quantize.embedding.weight"] = torch.randn(V, CD)
sd["quantize.codebook_used"] = torch.zeros(64)  # a buffer LlamaGen saves; loaders must skip it


# Independent functional forward (design §2).
def gn(x, name, silu):
    y = F.group_norm(x, GROUPS, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)
    return y * torch.sigmoid(y) if silu else y


def c(x, name, stride=1, pad=1):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=stride, padding=pad)


def res_f(x, name):
    h = c(gn(x, f"{name}.norm1", True), f"{name}.conv1")
    h = c(gn(h, f"{name}.norm2", True), f"{name}.conv2")
    skip = c(x, f"{name}.nin_shortcut", pad=0) if f"{name}.nin_shortcut.weight" in sd else x
    return skip + h


def attn_f(x, name):
    b, ch, hh, ww = x.shape
    h = gn(x, f"{name}.norm", False)
    q = c(h, f"{name}.q", pad=0).reshape(b, ch, -1).transpose(1, 2)
    k = c(h, f"{name}.k", pad=0).reshape(b, ch, -1)
    v = c(h, f"{name}.v", pad=0).reshape(b, ch, -1)
    w = torch.softmax(q @ k / ch ** 0.5, dim=-1)  # (b, q, k)
    out = (v @ w.transpose(1, 2)).reshape(b, ch, hh, ww)
    return x + c(out, f"{name}.proj_out", pad=0)


def encode(x):
    h = c(x, "encoder.conv_in")
    for i in range(len(MULT)):
        for j in range(NRES):
            h = res_f(h, f"encoder.conv_blocks.{i}.res.{j}")
            if i == len(MULT) - 1:
                h = attn_f(h, f"encoder.conv_blocks.{i}.attn.{j}")
        if i != len(MULT) - 1:
            h = c(F.pad(h, (0, 1, 0, 1)), f"encoder.conv_blocks.{i}.downsample.conv", stride=2, pad=0)
    h = attn_f(res_f(h, "encoder.mid.0"), "encoder.mid.1")
    h = res_f(h, "encoder.mid.2")
    h = c(gn(h, "encoder.norm_out", True), "encoder.conv_out")
    z = c(h, "quant_conv", pad=0).permute(0, 2, 3, 1).reshape(-1, CD)
    z = F.normalize(z, dim=-1)
    book = F.normalize(sd["quantize.embedding.weight"], dim=-1)
    return (z @ book.T).argmax(-1).reshape(x.shape[0], -1)


def decode(codes):
    g = SIZE >> (len(MULT) - 1)
    book = F.normalize(sd["quantize.embedding.weight"], dim=-1)
    z = book[codes.reshape(-1)].reshape(codes.shape[0], g, g, CD).permute(0, 3, 1, 2)
    h = c(c(z, "post_quant_conv", pad=0), "decoder.conv_in")
    h = res_f(attn_f(res_f(h, "decoder.mid.0"), "decoder.mid.1"), "decoder.mid.2")
    for i in range(len(MULT)):
        for j in range(NRES + 1):
            h = res_f(h, f"decoder.conv_blocks.{i}.res.{j}")
            if i == 0:
                h = attn_f(h, f"decoder.conv_blocks.{i}.attn.{j}")
        if i != len(MULT) - 1:
            h = c(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.conv_blocks.{i}.upsample.conv")
    return c(gn(h, "decoder.norm_out", True), "decoder.conv_out")


with torch.no_grad():
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    codes = encode(x)
    fixed_codes = torch.arange(2 * 4).reshape(2, 4) % V
    decoded = decode(fixed_codes)

out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
os.makedirs(out, exist_ok=True)
sd = {k: v.contiguous() for k, v in sd.items()}
torch.save({"model": sd}, f"{out}/vq16_tiny.pt")
save_file(sd, f"{out}/vq16_tiny.safetensors")
save_file(
    {"input": x.contiguous(), "codes": codes.to(torch.int64).contiguous(), "fixed_codes": fixed_codes.contiguous(), "decoded": decoded.contiguous()},
    f"{out}/vq16_tiny_expected.safetensors",
)
print(f"wrote {out}/vq16_tiny.pt, vq16_tiny.safetensors, vq16_tiny_expected.safetensors ({len(sd)} tensors)")
