# PyTorch CPU reference for the *sampling curve* of the shipped MNIST baseline's shape (6 LLaMA
# blocks, width 128, 4 heads, SwiGLU 512, vocabulary 512, 256 codes, a class slot), with
# classifier-free guidance (2 rows per image, one shared draw), a KV cache, 2 threads, random
# weights. Prints images/s per batch size. Compare with the baseline column of
# `dpar bench speed --no-models --sampling-curve 1,16,100` run in the same sitting:
#   python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch
#   /tmp/torch/bin/python bench/torch_sample_curve.py --batches 1,16,100
import argparse, statistics, time
import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--batches", default="1,16,100")
p.add_argument("--cfg", type=float, default=2.0)
p.add_argument("--reps", type=int, default=3)
args = p.parse_args()

torch.set_num_threads(2)
torch.manual_seed(0)
D, L, H, HID, V, S, C = 128, 6, 4, 512, 512, 256, 10
HD = D // H


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.n1 = torch.nn.Parameter(torch.ones(D))
        self.n2 = torch.nn.Parameter(torch.ones(D))
        self.wqkv = torch.nn.Linear(D, 3 * D, bias=False)
        self.wo = torch.nn.Linear(D, D, bias=False)
        self.w13 = torch.nn.Linear(D, 2 * HID, bias=False)
        self.w2 = torch.nn.Linear(HID, D, bias=False)

    @staticmethod
    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def step(self, x, pos, cos, sin, kc, vc):
        r = x.shape[0]
        q, k, v = self.wqkv(self.norm(x, self.n1)).view(r, 1, 3, H, HD).unbind(2)
        rot = lambda t: t * cos + torch.cat([-t[..., HD // 2:], t[..., : HD // 2]], -1) * sin
        q, k = rot(q), rot(k)
        kc[:, :, pos] = k[:, 0]
        vc[:, :, pos] = v[:, 0]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :, : pos + 1], vc[:, :, : pos + 1])
        x = x + self.wo(o.transpose(1, 2).reshape(r, 1, D))
        a, b = self.w13(self.norm(x, self.n2)).chunk(2, -1)
        return x + self.w2(F.silu(a) * b)


emb = torch.nn.Embedding(V, D)
cls = torch.nn.Embedding(C + 1, D)
blocks = [Block() for _ in range(L)]
norm_w = torch.ones(D)
head = torch.nn.Linear(D, V, bias=False)
inv = 1.0 / (10000 ** (torch.arange(0, HD // 2).float() * 2 / HD))


def generate(b):
    rows = 2 * b if args.cfg != 1.0 else b
    kcs = [torch.zeros(rows, H, S + 1, HD) for _ in blocks]
    vcs = [torch.zeros(rows, H, S + 1, HD) for _ in blocks]
    labels = torch.arange(b) % C
    if rows > b:
        labels = torch.cat([labels, torch.full((b,), C)])
    x = cls(labels).view(rows, 1, D)
    for pos in range(S):
        f = pos * inv
        cos = torch.cat([f, f]).cos().view(1, 1, 1, HD)
        sin = torch.cat([f, f]).sin().view(1, 1, 1, HD)
        for blk, kc, vc in zip(blocks, kcs, vcs):
            x = blk.step(x, pos, cos, sin, kc, vc)
        logits = head(Block.norm(x, norm_w))[:, 0]
        if rows > b:
            logits = logits[b:] + args.cfg * (logits[:b] - logits[b:])
        tok = torch.multinomial(F.softmax(logits, -1), 1)
        if rows > b:
            tok = torch.cat([tok, tok])
        x = emb(tok)


with torch.no_grad():
    generate(1)
    for b in [int(x) for x in args.batches.split(",")]:
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            generate(b)
            times.append(time.perf_counter() - t)
        print(f"TORCH CURVE batch {b}: {b / statistics.median(times):.1f} images/s (cfg {args.cfg}, median of {args.reps})")
