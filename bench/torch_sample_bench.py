# PyTorch CPU reference for *cached sampling* with the speed-bench model (4 LLaMA blocks, width
# 256, 4 heads, SwiGLU 688, vocab 1024): 16 sequences decoded for 256 steps with a KV cache,
# 2 threads, no guidance. Prints ms per step (whole batch). Compare with the "cached sample step"
# column of `dpar bench speed --models bench`. Run it in the same sitting:
#   python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch && /tmp/torch/bin/python bench/torch_sample_bench.py
import math, statistics, time
import torch
import torch.nn.functional as F

torch.set_num_threads(2)
torch.manual_seed(0)
D, L, H, HID, V, S, B = 256, 4, 4, 688, 1024, 256, 16
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
        # x: (B, 1, D); caches (B, H, S, HD)
        q, k, v = self.wqkv(self.norm(x, self.n1)).view(B, 1, 3, H, HD).unbind(2)
        rot = lambda t: t * cos + torch.cat([-t[..., HD // 2:], t[..., : HD // 2]], -1) * sin
        q, k = rot(q), rot(k)
        kc[:, :, pos] = k[:, 0]
        vc[:, :, pos] = v[:, 0]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :, : pos + 1], vc[:, :, : pos + 1])
        x = x + self.wo(o.transpose(1, 2).reshape(B, 1, D))
        a, b = self.w13(self.norm(x, self.n2)).chunk(2, -1)
        return x + self.w2(F.silu(a) * b)


emb = torch.nn.Embedding(V, D)
blocks = [Block() for _ in range(L)]
norm_w = torch.ones(D)
head = torch.nn.Linear(D, V, bias=False)
inv = 1.0 / (10000 ** (torch.arange(0, HD // 2).float() * 2 / HD))


def generate():
    kcs = [torch.zeros(B, H, S, HD) for _ in blocks]
    vcs = [torch.zeros(B, H, S, HD) for _ in blocks]
    tok = torch.zeros(B, 1, dtype=torch.long)
    times = []
    for pos in range(S):
        t = time.perf_counter()
        f = pos * inv
        cos = torch.cat([f, f]).cos().view(1, 1, 1, HD)
        sin = torch.cat([f, f]).sin().view(1, 1, 1, HD)
        x = emb(tok)
        for blk, kc, vc in zip(blocks, kcs, vcs):
            x = blk.step(x, pos, cos, sin, kc, vc)
        logits = head(Block.norm(x, norm_w))[:, 0]
        tok = torch.multinomial(F.softmax(logits, -1), 1)
        times.append(time.perf_counter() - t)
    return times


with torch.no_grad():
    generate()
    runs = [statistics.mean(generate()) for _ in range(3)]
print(f"TORCH SAMPLE batch {B}: {statistics.median(runs) * 1e3:.2f} ms per step (mean over {S} steps, median of 3 runs)")
