#!/usr/bin/env python3
"""Writes tests/fixtures/npz/: .npz archives made by numpy itself, which src/data/npz.rs must read.

- ref.npz (np.savez): `arr_0` uint8 images [4, 8, 8, 3], `mu` float64 [6], `sigma` float32 [6, 6]
  and `labels` int64 [4] (an ADM-style reference batch in miniature);
- ref-compressed.npz (np.savez_compressed): the same arrays, deflated.
The values follow simple formulas that tests/npz_numpy.rs recomputes.

Run with numpy: python3 scripts/make-npz-fixtures.py
"""
import os

import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "npz")
os.makedirs(OUT, exist_ok=True)
images = (np.arange(4 * 8 * 8 * 3) * 7 % 256).astype(np.uint8).reshape(4, 8, 8, 3)
mu = np.arange(6, dtype=np.float64) / 3.0 - 0.5
sigma = (np.arange(36, dtype=np.float32).reshape(6, 6) / 10.0).astype(np.float32)
sigma = sigma @ sigma.T
labels = np.array([3, -1, 0, 999], dtype=np.int64)
np.savez(os.path.join(OUT, "ref.npz"), images, mu=mu, sigma=sigma, labels=labels)
np.savez_compressed(os.path.join(OUT, "ref-compressed.npz"), images, mu=mu, sigma=sigma, labels=labels)
print("wrote", OUT)
