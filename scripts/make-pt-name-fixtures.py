#!/usr/bin/env python3
"""Writes tests/fixtures/pt-names/: one torch.save checkpoint per inner archive-name length 1..40
(name-NN.pt), their common safetensors twin (twin.safetensors), and the same state dict in
the legacy format (legacy.pt, as torch < 1.6 wrote it), and under a "module" key
(module-key.pt, as DeepSpeed saves).

torch.save names the folder inside its ZIP archive after the file it writes (the file name
without its extension), and the length of that name decides where the ZIP64 end records land.
The `zip` crate mislocates the central directory for some lengths (see
docs/upstream/zip-zip64-end-records.md); tests/pt_names.rs checks that every one of these loads
and equals the twin. Each file is saved under a temporary name of the wanted length, then renamed
(renaming does not change the name inside the archive).

The state dict covers what checkpoints hold: f32, f16, bf16, f64, int64 and uint8 tensors, a
0-d tensor, a transposed view, a slice with a storage offset, and a strided (every other column)
view, all nested under "model" as LlamaGen does.

Run with any torch >= 1.6 (and the `safetensors` package):
    python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch safetensors
    /tmp/torch/bin/python scripts/make-pt-name-fixtures.py
"""
import os
import string
import tempfile

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "pt-names")
g = torch.Generator().manual_seed(0)
base = torch.randn(6, 8, generator=g)
state = {
    "tok_embeddings.weight": torch.randn(5, 4, generator=g),
    "norm.weight": torch.randn(4, generator=g).to(torch.float16),
    "proj.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16),
    "scale": torch.tensor(2.5, dtype=torch.float64),
    "steps": torch.tensor([3, -7], dtype=torch.int64),
    "mask": torch.tensor([1, 0, 255], dtype=torch.uint8),
    "transposed": base.t(),
    "sliced": base[2:4],
    "strided": base[:, ::2],
}
os.makedirs(OUT, exist_ok=True)
save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(OUT, "twin.safetensors"))
letters = string.ascii_lowercase + string.digits
with tempfile.TemporaryDirectory() as tmp:
    for n in range(1, 41):
        stem = "".join(letters[(i * 7 + n) % len(letters)] for i in range(n))
        path = os.path.join(tmp, stem + ".pt")
        torch.save({"model": state, "epoch": 3}, path)
        os.replace(path, os.path.join(OUT, f"name-{n:02}.pt"))
# The same state dict in the legacy (pre-1.6) format, with an optimizer-like entry outside
# "model" whose storage comes first in the file.
# (Its storage keys are object ids, so the bytes differ from run to run; the values do not.)
torch.save({"optim": {"m": torch.randn(3, dtype=torch.float64, generator=g)}, "model": state},
           os.path.join(OUT, "legacy.pt"), _use_new_zipfile_serialization=False)
# A DeepSpeed-style save keeps the state dict under "module" (some of LlamaGen's releases).
torch.save({"module": state}, os.path.join(OUT, "module-key.pt"))
print("wrote", OUT)
