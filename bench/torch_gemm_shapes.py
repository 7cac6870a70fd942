# PyTorch CPU reference for the GEMMs of the speed-bench model (batch 16 × 256 positions, width
# 256, SwiGLU 688, vocabulary 1024) and 1024³, in f32 and bf16, 2 threads. One line per shape:
#   GEMM <name> <dtype> <m>x<n>x<k>: median <ms> ms, <GFLOP/s> GFLOP/s
# `dpar bench speed --torch PYTHON` runs it beside our GEMMs at the same shapes.
import statistics, time
import torch

torch.set_num_threads(2)
torch.manual_seed(0)
N, D, F, V = 16 * 256, 256, 688, 1024
# (name, m, n, k, layout): "nt" = A·Bᵀ (forward x·Wᵀ), "nn" = A·B (backward dX = dY·W),
# "tn" = Aᵀ·B (backward dW = dYᵀ·X).
SHAPES = [
    ("fwd-qkv", N, 3 * D, D, "nt"),
    ("fwd-w13", N, 2 * F, D, "nt"),
    ("fwd-w2", N, D, F, "nt"),
    ("fwd-head", N, V, D, "nt"),
    ("bwd-dx-w13", N, D, 2 * F, "nn"),
    ("bwd-dw-w13", 2 * F, D, N, "tn"),
    ("square-1024", 1024, 1024, 1024, "nn"),
]
for dtype in (torch.float32, torch.bfloat16):
    for name, m, n, k, layout in SHAPES:
        a = torch.randn(k, m) if layout == "tn" else torch.randn(m, k)
        b = torch.randn(n, k) if layout == "nt" else torch.randn(k, n)
        a, b = a.to(dtype), b.to(dtype)
        f = {"nt": lambda: a @ b.t(), "nn": lambda: a @ b, "tn": lambda: a.t() @ b}[layout]
        for _ in range(3):
            f()
        ts = []
        for _ in range(10):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        med = statistics.median(ts)
        print(f"GEMM {name} {str(dtype).replace('torch.', '')} {m}x{n}x{k}: median {med*1e3:.3f} ms, {2*m*n*k/med/1e9:.1f} GFLOP/s", flush=True)
