#!/usr/bin/env python3
"""Writes tests/fixtures/pil-resize/: Pillow's output for the resizes of LlamaGen's image
preprocessing, for `src/data/resample.rs` to match pixel for pixel.

The input is made from a formula (the test rebuilds it): 301×203 RGB with
r = (7x + 13y) mod 256, g = xy mod 256, b = 5(x xor y) mod 256 (plenty of high frequencies).
`center_crop_arr` is ADM's, as LlamaGen's extract_codes_c2i.py uses it.

usage: python3 scripts/make-pil-resize-fixture.py   (needs Pillow and numpy; run from the repo)
"""
import os

import numpy as np
from PIL import Image

OUT = "tests/fixtures/pil-resize"


def source():
    y, x = np.mgrid[0:203, 0:301]
    r = (7 * x + 13 * y) % 256
    g = (x * y) % 256
    b = (5 * (x ^ y)) % 256
    return Image.fromarray(np.stack([r, g, b], axis=-1).astype(np.uint8), "RGB")


def center_crop_arr(pil_image, image_size):
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def main():
    os.makedirs(OUT, exist_ok=True)
    img = source()
    outputs = {
        "center-crop-64.png": center_crop_arr(img, 64),
        "center-crop-100.png": center_crop_arr(img, 100),
        "bicubic-97x61.png": img.resize((97, 61), resample=Image.BICUBIC),
        "box-150x101.png": img.resize((150, 101), resample=Image.BOX),
    }
    for name, im in outputs.items():
        im.save(os.path.join(OUT, name))
        print(name, im.size)
    # The upscaling case (203 → 256) only as the SHA-256 of its raw RGB bytes (a PNG of it would
    # be 150 KB).
    import hashlib

    up = np.array(center_crop_arr(img, 256)).tobytes()
    with open(os.path.join(OUT, "center-crop-256.sha256"), "w") as f:
        f.write(hashlib.sha256(up).hexdigest() + "\n")
    import PIL

    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(
            f"Made by scripts/make-pil-resize-fixture.py with Pillow {PIL.__version__}: "
            "Pillow's BOX/BICUBIC resizes and ADM's center_crop_arr of a formula image.\n"
        )


if __name__ == "__main__":
    main()
