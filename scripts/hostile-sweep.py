#!/usr/bin/env python3
"""A hostile user's sweep over every command and file kind of `dpar`.

Each case builds its inputs (malformed files, absurd configs, impossible flags) in a scratch
folder, runs one command with a time limit and classifies what happened:

  ok        the command succeeded, as it should
  error     a clean error (exit 1, one `error:` message that names what the case requires)
  unnamed   a clean error whose message lacks the file or flag it is about
  accepted  the command succeeded although its input is wrong
  refused   the command failed although its input is fine
  panic     a Rust panic
  abort     killed by a signal (e.g. an allocation failure)
  hang      ran past the time limit
  broken    the command behaved, but a post-condition failed (e.g. it wrote inside a model folder)

usage: scripts/hostile-sweep.py [--bin target/release/dpar] [--only SUBSTRING] [--json OUT] [--keep]
Needs MNIST in data/mnist and the shipped models; stdlib only. Prints a markdown table.
"""
import argparse
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(ROOT, "data", "mnist")
MODELS = os.path.join(ROOT, "models", "mnist")


# ------------------------------------------------------------------ file makers

def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def idx(dims, data=None, gz=False, trailing=b""):
    header = bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    n = 1
    for d in dims:
        n *= d
    body = header + (bytes(n) if data is None else data) + trailing
    return gzip.compress(body) if gz else body


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return header, raw[8 + n:]


def write_safetensors(path, header, body):
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return write(path, struct.pack("<Q", len(text)) + text + body)


def edit_config(src_dir, dst_dir, change, files=("model.safetensors", "config.json")):
    """Copies a model folder, changing the config embedded in its weights (and config.json)."""
    os.makedirs(dst_dir, exist_ok=True)
    header, body = read_safetensors(os.path.join(src_dir, "model.safetensors"))
    config = json.loads(header["__metadata__"]["config"])
    change(config)
    header["__metadata__"]["config"] = json.dumps(config)
    write_safetensors(os.path.join(dst_dir, "model.safetensors"), header, body)
    if os.path.exists(os.path.join(src_dir, "config.json")):
        write(os.path.join(dst_dir, "config.json"), json.dumps(config).encode())
    return dst_dir


def edit_tensors(src_dir, dst_dir, change):
    """Copies a model folder, letting `change(header, body) -> body` rewrite the weights."""
    shutil.copytree(src_dir, dst_dir, dirs_exist_ok=True)
    header, body = read_safetensors(os.path.join(src_dir, "model.safetensors"))
    body = change(header, bytearray(body))
    write_safetensors(os.path.join(dst_dir, "model.safetensors"), header, bytes(body))
    return dst_dir


def first_tensor(header, dtype="F32"):
    name = sorted(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == dtype and len(v["shape"]) == 2)[0]
    return name, header[name]


def f32_as_f16_labelled_bf16(header, body):
    """Every F32 tensor stored as F16 bytes, labelled BF16 (the dtype mix-up of the issue)."""
    out = bytearray()
    for name in sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]):
        info = header[name]
        a, b = info["data_offsets"]
        chunk = bytes(body[a:b])
        start = len(out)
        if info["dtype"] in ("F32", "F16"):
            import array
            if info["dtype"] == "F32":
                vals = array.array("f", chunk)
                chunk = b"".join(struct.pack("<e", max(-65000.0, min(65000.0, v))) for v in vals)
            info["dtype"] = "BF16"
        out += chunk
        info["data_offsets"] = [start, len(out)]
    return out


# ------------------------------------------------------------------ the sweep

class Sweep:
    def __init__(self, binary, scratch, timeout, only=""):
        self.bin, self.dir, self.timeout, self.only = binary, scratch, timeout, only
        self.rows = []
        self.base = {}

    def p(self, *parts):
        return os.path.join(self.dir, *parts)

    def run(self, args, env=None, cwd=None):
        e = dict(os.environ)
        e.update(env or {})
        t = time.time()
        try:
            r = subprocess.run([self.bin] + [str(a) for a in args], capture_output=True, text=True,
                               timeout=self.timeout, env=e, cwd=cwd or ROOT)
            return r.returncode, r.stdout + r.stderr, time.time() - t
        except subprocess.TimeoutExpired as x:
            out = (x.stdout or b"").decode(errors="replace") + (x.stderr or b"").decode(errors="replace")
            return None, out, time.time() - t

    def case(self, group, name, args, expect="error", names=(), env=None, post=None, cwd=None):
        """Runs one case. `names`: substrings the error must contain (the file or flag)."""
        if self.only and self.only not in f"{group}: {name}":
            return
        code, out, secs = self.run(args, env, cwd)
        if code is None:
            outcome = "hang"
        elif "panicked" in out or code == 101:
            outcome = "panic"
        elif code < 0 or "memory allocation of" in out:
            outcome = "abort"
        elif code == 0:
            outcome = "ok" if expect == "ok" else "accepted"
        elif expect == "ok":
            outcome = "refused"
        elif all(n in out for n in names):
            outcome = "error"
        else:
            outcome = "unnamed"
        if post and outcome in ("ok", "error"):
            problem = post()
            if problem:
                outcome, out = "broken", problem + "\n" + out
        message = next((l for l in out.splitlines() if l.startswith("error:")), out.strip().splitlines()[-1] if out.strip() else "")
        self.rows.append({"group": group, "case": name, "expect": expect, "outcome": outcome,
                          "seconds": round(secs, 1), "message": message[:300]})
        mark = "  " if outcome in ("ok", "error") else "!!"
        print(f"{mark} {outcome:9} {group}: {name}  {message[:140]}", file=sys.stderr, flush=True)


def build_bases(s):
    """Small valid inputs the cases start from: shard sets with entropies, tiny runs."""
    codes = s.p("base/codes")
    for split, n in (("train", 48), ("test", 24)):
        code, out, _ = s.run(["tokenize", "--split", split, "--max-images", n, "--out", f"{codes}/{split}"])
        assert code == 0, out
    code, out, _ = s.run(["entropy", "compute", "--model", f"{MODELS}/entropy", "--codes", f"{codes}/train", "--codes", f"{codes}/test"])
    assert code == 0, out
    budget = ["--steps", "3", "--batch-size", "4", "--val-images", "8", "--eval-every", "0", "--checkpoint-every", "1"]
    shape, data = ["--dim", "32", "--heads", "2"], ["--codes", f"{codes}/train", "--val-codes", f"{codes}/test"]
    for model, layers in (("gpt", "1"), ("dpar", "1+1+1")):
        code, out, _ = s.run(["train", "--model", model, "--layers", layers, *shape, *budget, *data, "--out", s.p(f"base/{model}")])
        assert code == 0, out
    s.base = {"codes": codes, "budget": budget, "shape": shape, "data": data}


def cases(s):
    c, p = s.case, s.p
    codes, budget, shape, data = s.base["codes"], s.base["budget"], s.base["shape"], s.base["data"]
    tiny = shape + budget + data
    train_codes, test_codes = f"{codes}/train", f"{codes}/test"
    labels = idx([20], bytes(i % 10 for i in range(20)))

    # ---- IDX data
    def idx_set(name, images, labs=labels):
        d = p("idx", name)
        write(f"{d}/train-images-idx3-ubyte", images)
        write(f"{d}/train-labels-idx1-ubyte", labs)
        return d
    c("idx", "images file cut short", ["data", "info", "--data", idx_set("short", idx([20, 28, 28])[:-100])], names=["train-images-idx3-ubyte"])
    c("idx", "garbage bytes after the declared images", ["data", "info", "--data", idx_set("trail", idx([20, 28, 28], trailing=b"junk" * 10))], names=["train-images-idx3-ubyte"])
    c("idx", "garbage bytes after the declared labels", ["data", "info", "--data", idx_set("ltrail", idx([20, 28, 28]), idx([20], bytes(20), trailing=b"x"))], names=["train-labels-idx1-ubyte"])
    c("idx", "gzip with garbage after the stream", ["data", "info", "--data", idx_set("gztrail", idx([20, 28, 28], gz=True) + b"garbage")], names=["train-images-idx3-ubyte"])
    gz = bytearray(idx([20, 28, 28], bytes(range(256)) * 61 + bytes(20 * 784 - 256 * 61), gz=True))
    gz[-6] ^= 0xFF  # the CRC-32 of the trailer
    c("idx", "gzip whose CRC is wrong", ["data", "info", "--data", idx_set("gzcrc", bytes(gz))], names=["train-images-idx3-ubyte"])
    c("idx", "gzip cut short", ["data", "info", "--data", idx_set("gzshort", idx([20, 28, 28], gz=True)[:-20])], names=["train-images-idx3-ubyte"])
    c("idx", "gzip declaring 2^60 bytes", ["data", "info", "--data", idx_set("gzbomb", gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">III", 1 << 20, 1 << 20, 1 << 20)))], names=["train-images-idx3-ubyte"])
    big = idx([6000, 28, 28], gz=True)
    c("idx", "gzip holding more than the memory budget", ["data", "info", "--data", idx_set("gzbudget", big, idx([6000], bytes(6000)))], env={"DPAR_MEMORY_BUDGET": "3000000"}, names=["train-images-idx3-ubyte"])
    c("idx", "raw file larger than the memory budget", ["data", "info", "--data", idx_set("rawbudget", idx([6000, 28, 28]), idx([6000], bytes(6000)))], env={"DPAR_MEMORY_BUDGET": "3000000"}, names=["train-images-idx3-ubyte"])
    c("idx", "label count differs from image count", ["data", "info", "--data", idx_set("count", idx([20, 28, 28]), idx([19], bytes(19)))], names=["19", "20"])
    c("idx", "wrong magic", ["data", "info", "--data", idx_set("magic", b"\x00\x00\x0d\x03" + idx([20, 28, 28])[4:])], names=["train-images-idx3-ubyte"])
    c("idx", "labels file with image magic", ["data", "info", "--data", idx_set("swap", idx([20, 28, 28]), idx([20, 28, 28]))], names=["train-labels-idx1-ubyte"])
    c("idx", "zero images", ["data", "info", "--data", idx_set("zero", idx([0, 28, 28]), idx([0]))], names=["train-images-idx3-ubyte"])
    c("idx", "zero-pixel images", ["data", "info", "--data", idx_set("zeropx", idx([20, 0, 28]))], names=["train-images-idx3-ubyte"])
    c("idx", "a stray label 255", ["data", "info", "--data", idx_set("stray", idx([20, 28, 28]), idx([20], bytes([255] + [1] * 19)))], names=["255"])
    d = p("idx", "folder-file")
    os.makedirs(f"{d}/train-images-idx3-ubyte", exist_ok=True)
    write(f"{d}/train-labels-idx1-ubyte", labels)
    c("idx", "the images 'file' is a folder", ["data", "info", "--data", d], names=["train-images-idx3-ubyte", "folder"])
    c("idx", "--images without --labels", ["data", "info", "--images", f"{MNIST}/t10k-images-idx3-ubyte"], names=["--labels"])
    c("idx", "--class-names fewer than the labels", ["data", "info", "--data", MNIST, "--split", "test", "--class-names", "a,b"], names=["--class-names"])
    c("idx", "--class-names with a repeated name", ["data", "info", "--data", MNIST, "--split", "test", "--class-names", "a,a,b,c,d,e,f,g,h,i"], names=["--class-names"])
    c("idx", "--data that does not exist", ["data", "info", "--data", p("nowhere")], names=["nowhere"])
    c("idx", "a valid set", ["data", "info", "--data", MNIST, "--split", "test"], expect="ok")

    # ---- image folders
    def folder(name, files):
        d = p("folders", name)
        for rel, data in files.items():
            write(f"{d}/{rel}", data)
        return d
    png = open(os.path.join(ROOT, "docs/images/patches.png"), "rb").read()
    c("folder", "an empty class folder", ["data", "info", "--data", folder("emptyclass", {"a/x.png": png}) + "/../emptyclass"], expect="ok")
    d = folder("emptyclass2", {"a/x.png": png})
    os.makedirs(f"{d}/b", exist_ok=True)
    c("folder", "one class folder is empty", ["data", "info", "--data", d], names=["b"])
    c("folder", "a corrupt PNG", ["data", "info", "--data", folder("corrupt", {"a/x.png": png[:200], "b/y.png": png})], names=["x.png"])
    huge = bytearray(png[:33])
    huge[16:24] = struct.pack(">II", 200000, 200000)
    c("folder", "a PNG header declaring 200000² pixels", ["data", "info", "--data", folder("hugepng", {"a/x.png": bytes(huge) + png[33:], "b/y.png": png})], names=["x.png"])
    c("folder", "a zero-byte JPEG", ["data", "info", "--data", folder("zerojpg", {"a/x.jpg": b"", "b/y.png": png})], names=["x.jpg"])
    c("folder", "a folder with no class folders", ["data", "info", "--data", folder("flat", {"x.png": png})], names=["flat"])

    # ---- tokenizer configs
    for size, label in ((1 << 32, "2^32"), (1 << 40, "2^40"), (1 << 62, "2^62"), (4096, "4096"), (1 << 20, "2^20")):
        cfg = write(p("tok", f"preset-{label}.json"), json.dumps(dict(json.loads(read_safetensors(f"{MODELS}/tokenizer/model.safetensors")[0]["__metadata__"]["config"])["model"], image_size=size)).encode())
        tok = edit_config(f"{MODELS}/tokenizer", p("tok", f"embedded-{label}"), lambda c, size=size: c["model"].update(image_size=size))
        for cmd in (["tokenizer", "eval", "--max-images", "4"], ["tokenize", "--split", "test", "--max-images", "4", "--out", p("tok", f"codes-{label}")],
                    ["tokenizer", "reconstruct", "--n", "4", "--out", p("tok", f"r-{label}.png")]):
            c("tokenizer config", f"{cmd[0]} {cmd[1] if cmd[0] == 'tokenizer' else ''}: embedded image_size {label}", cmd + ["--tokenizer", tok], names=["image_size"])
        c("tokenizer config", f"tokenizer eval: --tokenizer-preset image_size {label}", ["tokenizer", "eval", "--max-images", "4", "--tokenizer", f"{MODELS}/tokenizer/model.safetensors", "--tokenizer-preset", cfg], names=["image_size"])
    for key, value, label in (("in_channels", 2, "in_channels 2"), ("ch_mult", [], "empty ch_mult"), ("codebook_size", 0, "codebook 0"),
                              ("codebook_size", 1 << 40, "codebook 2^40"), ("norm_groups", 0, "norm_groups 0"), ("ch", 1 << 30, "ch 2^30")):
        tok = edit_config(f"{MODELS}/tokenizer", p("tok", f"bad-{label.replace(' ', '-')}"), lambda c, key=key, value=value: c["model"].update({key: value}))
        c("tokenizer config", f"embedded {label}", ["tokenizer", "eval", "--max-images", "4", "--tokenizer", tok], names=[tok])
    tok = edit_config(f"{MODELS}/tokenizer", p("tok", "unknown-key"), lambda c: c["model"].update(imagesize=32))
    c("tokenizer config", "embedded config with an unknown key", ["tokenizer", "eval", "--max-images", "4", "--tokenizer", tok], names=["imagesize"])
    c("tokenizer config", "--tokenizer-preset file that is not JSON", ["tokenizer", "eval", "--max-images", "4", "--tokenizer", f"{MODELS}/tokenizer/model.safetensors", "--tokenizer-preset", write(p("tok", "bad.json"), b"{nope")], names=["bad.json"])
    empty = write(p("tok", "empty.safetensors"), b"")
    c("tokenizer config", "an empty --tokenizer file", ["tokenizer", "eval", "--max-images", "4", "--tokenizer", empty], names=["empty.safetensors", "the file is empty"])
    c("tokenizer config", "sample with an empty --tokenizer file", ["sample", "--per-class", "1", "--tokenizer", empty, "--out", p("tok", "s")], names=["empty.safetensors", "the file is empty"])

    # ---- weight files
    def weights(name, change):
        return edit_tensors(f"{MODELS}/gpt", p("w", name), change)
    def cut(h, b):
        return b[:-1000]
    c("weights", "weights cut short", ["sample", "--ckpt", weights("short", cut), "--per-class", "1", "--out", p("w", "o")], names=["model.safetensors"])
    c("weights", "extra bytes after the tensors", ["sample", "--ckpt", weights("extra", lambda h, b: b + b"\0" * 64), "--per-class", "1", "--out", p("w", "o")], names=["model.safetensors"])
    c("weights", "F16 bytes labelled BF16 (baseline)", ["sample", "--ckpt", weights("f16bf16", f32_as_f16_labelled_bf16), "--per-class", "1", "--out", p("w", "o")], names=["model.safetensors"])
    ent = edit_tensors(f"{MODELS}/entropy", p("w", "entropy-f16bf16"), f32_as_f16_labelled_bf16)
    ent_codes = p("w", "ent-codes")
    shutil.copytree(test_codes, ent_codes, dirs_exist_ok=True)
    c("weights", "F16 bytes labelled BF16 (entropy model)", ["entropy", "compute", "--model", ent, "--codes", ent_codes], names=["model.safetensors"])
    def nan(h, b):
        name, info = first_tensor(h, "F16") if any(v.get("dtype") == "F16" for k, v in h.items() if k != "__metadata__") else first_tensor(h)
        a = info["data_offsets"][0]
        b[a:a + 2] = b"\x00\x7e"
        return b
    c("weights", "a NaN weight", ["sample", "--ckpt", weights("nan", nan), "--per-class", "1", "--out", p("w", "o")], names=["model.safetensors"])
    def to_int(h, b):
        name = sorted(k for k in h if k != "__metadata__")[0]
        h[name]["dtype"] = "I16" if h[name]["dtype"] in ("F16", "BF16") else "I32"
        return b
    c("weights", "an integer tensor", ["sample", "--ckpt", weights("int", to_int), "--per-class", "1", "--out", p("w", "o")], names=["model.safetensors"])
    def drop(h, b):
        del h[sorted(k for k in h if k != "__metadata__")[0]]
        return b
    c("weights", "a missing tensor", ["sample", "--ckpt", weights("missing", drop), "--per-class", "1", "--out", p("w", "o")], names=["model.safetensors"])
    def extra(h, b):
        h["stray.weight"] = {"dtype": "F16", "shape": [2], "data_offsets": [len(b), len(b) + 4]}
        return b + b"\0" * 4
    c("weights", "an extra tensor", ["sample", "--ckpt", weights("extra-t", extra), "--per-class", "1", "--out", p("w", "o")], names=["stray.weight"])
    def header_huge(h, b):
        return b
    hh = p("w", "hugeheader")
    shutil.copytree(f"{MODELS}/gpt", hh, dirs_exist_ok=True)
    raw = bytearray(open(f"{hh}/model.safetensors", "rb").read())
    raw[:8] = struct.pack("<Q", 1 << 60)
    write(f"{hh}/model.safetensors", bytes(raw))
    c("weights", "a header length of 2^60", ["sample", "--ckpt", hh, "--per-class", "1", "--out", p("w", "o")], names=["model.safetensors"])
    for key, value, label in (("dim", 0, "width 0"), ("n_layer", 10 ** 9, "10^9 layers"), ("vocab_size", 1, "vocabulary 1"), ("grid_size", 1 << 40, "grid 2^40"), ("num_classes", 0, "0 classes")):
        bad = edit_config(f"{MODELS}/gpt", p("w", f"cfg-{key}"), lambda c, key=key, value=value: c["model"].update({key: value}))
        c("weights", f"embedded config: {label}", ["sample", "--ckpt", bad, "--per-class", "1", "--out", p("w", "o")], names=[bad])
    bad = edit_config(f"{MODELS}/dpar", p("w", "dpar-width0"), lambda c: c["model"].update(dim=0))
    c("weights", "embedded DPAR config: width 0", ["sample", "--ckpt", bad, "--per-class", "1", "--out", p("w", "o")], names=[bad])
    bad = edit_config(f"{MODELS}/gpt", p("w", "cfg-unknown"), lambda c: c["model"].update(n_layers=6))
    c("weights", "embedded config with an unknown key", ["sample", "--ckpt", bad, "--per-class", "1", "--out", p("w", "o")], names=["n_layers"])
    d = p("w", "brokenjson")
    shutil.copytree(f"{MODELS}/gpt", d, dirs_exist_ok=True)
    header, body = read_safetensors(f"{d}/model.safetensors")
    del header["__metadata__"]["config"]
    write_safetensors(f"{d}/model.safetensors", header, body)
    write(f"{d}/config.json", b"{ broken")
    c("weights", "a broken config.json beside weights without an embedded config", ["sample", "--ckpt", d, "--per-class", "1", "--out", p("w", "o")], names=["config.json"])
    d = p("w", "dirweights")
    os.makedirs(f"{d}/model.safetensors", exist_ok=True)
    c("weights", "a folder where model.safetensors should be", ["sample", "--ckpt", d, "--per-class", "1", "--out", p("w", "o")], names=["model.safetensors", "folder"])
    c("weights", "a .pt that is not a zip or pickle", ["sample", "--ckpt", write(p("w", "x.pt"), b"not a checkpoint" * 10), "--preset", "gpt-b", "--per-class", "1", "--out", p("w", "o")], names=["x.pt"])

    # ---- shard sets
    def shard_set(name, change_manifest=None, change_shard=None):
        d = p("shards", name)
        shutil.copytree(train_codes, d, dirs_exist_ok=True)
        if change_manifest:
            m = json.load(open(f"{d}/manifest.json"))
            change_manifest(m, d)
            write(f"{d}/manifest.json", json.dumps(m).encode())
        if change_shard:
            change_shard(d)
        return d
    dup = shard_set("dup", lambda m, d: m.update(shards=m["shards"] * 2, images=m["images"] * 2))
    c("shards", "a manifest listing one shard twice", ["train", "--model", "gpt", "--layers", "1", *tiny[:-4], "--codes", dup, "--val-codes", "none", "--out", p("shards", "run-dup")], names=["manifest.json"])
    def empty_shard(m, d):
        header, body = read_safetensors(f"{d}/shard-00000.safetensors")
        for k, v in header.items():
            if k != "__metadata__":
                v["shape"][0] = 0
                v["data_offsets"] = [0, 0]
        write_safetensors(f"{d}/shard-00001.safetensors", header, b"")
        m["shards"].append({"file": "shard-00001.safetensors", "images": 0, "codes_hash": m["shards"][0]["codes_hash"]})
    emp = shard_set("empty", empty_shard)
    c("shards", "a shard with 0 images", ["entropy", "compute", "--model", f"{MODELS}/entropy", "--codes", emp], names=["shard-00001"])
    c("shards", "a set without manifest.json", ["train", "--model", "gpt", *tiny[:-4], "--codes", shard_set("noman", change_shard=lambda d: os.remove(f"{d}/manifest.json")), "--val-codes", "none", "--out", p("shards", "run-noman")], names=["manifest"])
    c("shards", "a manifest with the wrong image count", ["train", "--model", "gpt", *tiny[:-4], "--codes", shard_set("count", lambda m, d: m.update(images=m["images"] + 1)), "--val-codes", "none", "--out", p("shards", "run-count")], names=["manifest.json"])
    def cut_shard(d):
        raw = open(f"{d}/shard-00000.safetensors", "rb").read()
        write(f"{d}/shard-00000.safetensors", raw[:-100])
    c("shards", "a shard cut short", ["train", "--model", "gpt", *tiny[:-4], "--codes", shard_set("cut", change_shard=cut_shard), "--val-codes", "none", "--out", p("shards", "run-cut")], names=["shard-00000"])
    def extra_bytes(d):
        raw = open(f"{d}/shard-00000.safetensors", "rb").read()
        write(f"{d}/shard-00000.safetensors", raw + b"\0" * 16)
    c("shards", "a shard with bytes after its tensors", ["train", "--model", "gpt", *tiny[:-4], "--codes", shard_set("extra", change_shard=extra_bytes), "--val-codes", "none", "--out", p("shards", "run-extra")], names=["shard-00000"])
    c("shards", "manifest.json that is not JSON", ["train", "--model", "gpt", *tiny[:-4], "--codes", shard_set("badjson", change_shard=lambda d: write(f"{d}/manifest.json", b"[")), "--val-codes", "none", "--out", p("shards", "run-badjson")], names=["manifest.json"])

    # ---- entropy sidecars
    def sidecar(name, change):
        d = p("entropy", name)
        shutil.copytree(train_codes, d, dirs_exist_ok=True)
        f = f"{d}/shard-00000.entropy.safetensors"
        header, body = read_safetensors(f)
        body = change(header, bytearray(body))
        write_safetensors(f, header, bytes(body))
        return d
    def set_value(v):
        def change(h, b):
            for i in range(1, 200, 7):
                b[4 * i:4 * i + 4] = struct.pack("<f", v)
            return b
        return change
    for v, label in ((-3.0, "negative"), (float("nan"), "NaN"), (float("-inf"), "−∞"), (float("inf"), "+∞ past the first code")):
        d = sidecar(label.split()[0].replace("−", "minus").replace("+", "plus"), set_value(v))
        c("entropies", f"{label} entropies: patchify", ["patchify", "--codes", d, "--target-mean-len", "1.8"], names=["entropy.safetensors"])
        c("entropies", f"{label} entropies: train dpar", ["train", "--model", "dpar", "--layers", "1+1+1", *tiny[:-4], "--codes", d, "--val-codes", "none", "--out", p("entropy", f"run-{len(s.rows)}")], names=["entropy.safetensors"])
    def to_f16(h, b):
        import array
        vals = array.array("f", bytes(b))
        h["entropy"]["dtype"] = "F16"
        out = b"".join(struct.pack("<e", min(v, 60000.0)) for v in vals)
        h["entropy"]["data_offsets"] = [0, len(out)]
        return bytearray(out)
    c("entropies", "an F16 sidecar", ["patchify", "--codes", sidecar("f16", to_f16), "--target-mean-len", "1.8"], names=["entropy.safetensors"])
    def wrong_shape(h, b):
        h["entropy"]["shape"] = [h["entropy"]["shape"][0] * 2, 128]
        return b
    c("entropies", "a sidecar of the wrong shape", ["patchify", "--codes", sidecar("shape", wrong_shape), "--target-mean-len", "1.8"], names=["entropy.safetensors"])

    # ---- training flags
    g = ["train", "--model", "gpt", "--layers", "1", *budget, *data]
    def out(name):
        return p("train", name)
    for flags, label, name in ((["--world-size", "1000"], "--world-size 1000", "--world-size"), (["--world-size", "100000"], "--world-size 100000", "--world-size"),
                               (["--world-size", "0"], "--world-size 0", "--world-size"), (["--world-size", "3"], "--world-size 3 with batch 4", "--world-size"),
                               (["--grad-accum", "0"], "--grad-accum 0", "--grad-accum"), (["--grad-accum", "5"], "--grad-accum 5 with batch 4", "--grad-accum"),
                               (["--batch-size", "0"], "--batch-size 0", "--batch-size"), (["--batch-size", "1000000000"], "--batch-size 10^9", "--batch-size"),
                               (["--steps", "0"], "--steps 0", "--steps"), (["--lr", "nan"], "--lr NaN", "--lr"), (["--lr", "-1"], "--lr -1", "--lr"),
                               (["--lr", "inf"], "--lr inf", "--lr"), (["--weight-decay", "-1"], "--weight-decay -1", "--weight-decay"),
                               (["--grad-clip", "-1"], "--grad-clip -1", "--grad-clip"), (["--dim", "0"], "--dim 0", "--dim"), (["--heads", "0"], "--heads 0", "--heads"),
                               (["--dim", "33"], "--dim 33 --heads 2", "33"), (["--dim", "1000000"], "--dim 10^6", "--dim"), (["--layers", "0"], "--layers 0", "--layers"),
                               (["--layers", "x"], "--layers x", "--layers"), (["--dropout", "1.5"], "--dropout 1.5", "dropout"), (["--warmup", "1000000"], "--warmup past --steps", "--warmup"),
                               (["--min-lr", "1"], "--min-lr above --lr", "--min-lr"), (["--val-images", "0"], "--val-images 0", "--val-images"),
                               (["--checkpoint-every", "0"], "--checkpoint-every 0", "--checkpoint-every"), (["--log-every", "0"], "--log-every 0", "--log-every")):
        shaped = flags if any(f in ("--dim", "--heads") for f in flags) else shape + flags
        if "--dim" in flags and "--heads" not in flags:
            shaped = flags + ["--heads", "2"]
        c("train flags", label, g + shaped + ["--out", out(f"f{len(s.rows)}")], names=[name])
    d = ["train", "--model", "dpar", *budget, *data]
    for flags, label, name in ((["--target-mean-len", "0"], "--target-mean-len 0", "--target-mean-len"), (["--target-mean-len", "100"], "--target-mean-len 100", "--target-mean-len"),
                               (["--threshold", "nan"], "--threshold NaN", "θ"), (["--max-patch-len", "0"], "--max-patch-len 0", "P"),
                               (["--layers", "1+1"], "DPAR --layers 1+1", "--layers"), (["--dim", "40", "--heads", "2"], "DPAR head dim 20 (not ÷ 16)", "16")):
        extra = ([] if "--dim" in flags else shape) + ([] if "--layers" in flags else ["--layers", "1+1+1"])
        c("train flags", label, d + extra + flags + ["--out", out(f"d{len(s.rows)}")], names=[name])
    cfg = json.load(open(s.p("base/gpt/config.json")))
    cfg["batchsize"] = 8
    c("train flags", "--config with an unknown key", ["train", "--model", "gpt", "--config", write(p("train", "unknown.json"), json.dumps(cfg).encode()), "--out", out("unknown")], names=["batchsize", "unknown.json"])
    cfg = json.load(open(s.p("base/gpt/config.json")))
    cfg["model"]["dim"] = 0
    c("train flags", "--config with width 0", ["train", "--model", "gpt", "--config", write(p("train", "width0.json"), json.dumps(cfg).encode()), "--out", out("width0")], names=["width0.json"])
    c("train flags", "--config that is not JSON", ["train", "--model", "gpt", "--config", write(p("train", "bad.json"), b"{"), "--out", out("badcfg")], names=["bad.json"])
    c("train flags", "--config that does not exist", ["train", "--model", "gpt", "--config", p("train", "none.json"), "--out", out("nocfg")], names=["none.json"])
    cfg = json.load(open(s.p("base/gpt/config.json")))
    other = p("train", "other-codes")
    shutil.copytree(train_codes, other + "/train", dirs_exist_ok=True)
    shutil.copytree(test_codes, other + "/test", dirs_exist_ok=True)
    cfg["codes"], cfg["val_codes"] = other + "/train", other + "/test"
    cfg_file = write(p("train", "codes.json"), json.dumps(cfg).encode())
    def uses_config_codes():
        used = json.load(open(out("cfgcodes") + "/config.json"))
        return None if used["codes"] == other + "/train" and used["val_codes"] == other + "/test" else f"trained on {used['codes']}, not the config's codes"
    c("train flags", "--config names its own codes (from another folder)", ["train", "--model", "gpt", "--config", cfg_file, "--out", out("cfgcodes")], expect="ok", post=uses_config_codes, cwd=p())
    # A finished run resumed.
    log = s.p("base/gpt/log.jsonl")
    before = open(log).read()
    def log_untouched():
        return None if open(log).read() == before else "--resume on a finished run changed its log.jsonl"
    c("train flags", "--resume on a finished run", ["train", "--model", "gpt", "--out", s.p("base/gpt"), "--resume"], expect="ok", post=log_untouched)
    broken = p("train", "broken-ckpt")
    shutil.copytree(s.p("base/gpt"), broken, dirs_exist_ok=True)
    raw = open(f"{broken}/checkpoint.safetensors", "rb").read()
    write(f"{broken}/checkpoint.safetensors", raw[:len(raw) // 2])
    c("train flags", "--resume from a cut checkpoint", ["train", "--model", "gpt", "--out", broken, "--resume", "--steps", "5"], names=["checkpoint.safetensors"])
    bad = p("train", "bad-run-config")
    shutil.copytree(s.p("base/gpt"), bad, dirs_exist_ok=True)
    write(f"{bad}/config.json", b"{\"kind\": \"gpt\"")
    c("train flags", "--resume with a broken config.json", ["train", "--model", "gpt", "--out", bad, "--resume", "--steps", "5"], names=["config.json"])
    c("train flags", "--grad-clip 0 (clipping off)", g + shape + ["--grad-clip", "0", "--out", out("clip0")], expect="ok")
    c("train flags", "--val-codes that does not exist", ["train", "--model", "gpt", "--layers", "1", *shape, *budget, "--codes", train_codes, "--val-codes", p("nowhere"), "--out", out("noval")], names=["--val-codes", "nowhere"])
    c("entropy train", "--model on entropy train", ["entropy", "train", "--model", "gpt", "--out", out("e1")], names=["--model"])
    c("entropy train", "--steps 0", ["entropy", "train", "--codes", train_codes, "--steps", "0", "--out", out("e2")], names=["--steps"])

    # ---- tokenize, entropy compute, patchify
    c("tokenize", "--batch 0", ["tokenize", "--split", "test", "--max-images", "4", "--batch", "0", "--out", p("tk", "b0")], names=["--batch"])
    c("tokenize", "--shard-size 0", ["tokenize", "--split", "test", "--max-images", "4", "--shard-size", "0", "--out", p("tk", "s0")], names=["--shard-size"])
    c("tokenize", "--max-images 0", ["tokenize", "--split", "test", "--max-images", "0", "--out", p("tk", "m0")], names=["--max-images"])
    c("tokenize", "--crop-range 5 with --ten-crop", ["tokenize", "--split", "test", "--max-images", "4", "--ten-crop", "--crop-range", "5", "--out", p("tk", "cr")], names=["--crop-range"])
    c("tokenize", "--split that does not exist", ["tokenize", "--split", "valid", "--out", p("tk", "sp")], names=["valid"])
    c("entropy compute", "--batch 0", ["entropy", "compute", "--model", f"{MODELS}/entropy", "--codes", shard_set("b0"), "--batch", "0"], names=["--batch"])
    c("entropy compute", "a class-conditional model", ["entropy", "compute", "--model", f"{MODELS}/gpt", "--codes", shard_set("cc")], names=[f"{MODELS}/gpt"])
    foreign = edit_config(f"{MODELS}/entropy", p("ec", "foreign"), lambda c: c.update(tokenizer_id="0" * 64))
    c("entropy compute", "a model of another tokenizer's codes", ["entropy", "compute", "--model", foreign, "--codes", shard_set("other")], names=["foreign"])
    c("patchify", "--target-mean-len 0", ["patchify", "--codes", train_codes, "--target-mean-len", "0"], names=["--target-mean-len"])
    c("patchify", "--target-mean-len 1000", ["patchify", "--codes", train_codes, "--target-mean-len", "1000"], names=["--target-mean-len"])
    c("patchify", "--show 10^9", ["patchify", "--codes", train_codes, "--target-mean-len", "1.8", "--show", "1000000000", "--out", p("pf", "x.png")], expect="ok")
    c("patchify", "--threshold -inf", ["patchify", "--codes", train_codes, "--threshold=-inf"], expect="ok")

    # ---- sample
    sm = ["sample", "--out", p("sm", "o")]
    for flags, label, name in ((["--per-class", "0"], "--per-class 0", "--per-class"), (["--batch-size", "0"], "--batch-size 0", "--batch-size"),
                               (["--cfg", "nan"], "--cfg NaN", "cfg"), (["--cfg", "-1"], "--cfg -1", "cfg"), (["--temperature", "-1"], "--temperature -1", "temperature"),
                               (["--top-p", "2"], "--top-p 2", "top-p"), (["--top-p", "0"], "--top-p 0", "top-p"), (["--classes", "99"], "--classes 99", "99"),
                               (["--classes", "seven"], "--classes seven (no names recorded)", "seven"), (["--per-class", "100000000"], "--per-class 10^8", "--max-images"),
                               (["--threshold", "nan"], "--threshold NaN", "θ"), (["--max-patch-len", "0"], "--max-patch-len 0", "P"),
                               (["--ckpt", p("nowhere")], "--ckpt that does not exist", "nowhere"), (["--entropy-model", f"{MODELS}/gpt"], "--entropy-model: the baseline", "entropy")):
        c("sample", label, sm + flags, names=[name])
    c("sample", "--top-k 10^9", sm + ["--per-class", "1", "--top-k", "1000000000"], expect="ok")
    c("sample", "--npz into a folder that cannot be written", ["sample", "--per-class", "1", "--npz", "/proc/x/s.npz"], names=["--npz"])
    c("sample", "--out that cannot be written", ["sample", "--per-class", "1", "--out", "/proc/x"], names=["--out"])
    c("sample", "--config with an unknown key", ["sample", "--config", write(p("sm", "s.json"), b'{"seeed": 3}')], names=["seeed", "s.json"])
    c("sample", "--config that is not JSON", ["sample", "--config", write(p("sm", "b.json"), b"[")], names=["b.json"])

    # ---- eval, export, plots
    c("eval", "eval samples --codes that does not exist", ["eval", "samples", "--codes", p("nowhere")], names=["nowhere"])
    c("eval", "eval samples --n 0", ["eval", "samples", "--codes", s.p("base/codes/test"), "--n", "0"], names=["--n"])
    c("eval", "eval samples on a corrupt .npz", ["eval", "samples", "--codes", write(p("ev", "x.npz"), b"PK\x03\x04broken")], names=["x.npz"])
    c("eval", "eval fid without the weights", ["eval", "fid", "--inception", p("nowhere.pth"), "--samples", p("ev"), "--ref", p("ev")], names=["nowhere.pth"])
    c("eval", "eval real --n 0", ["eval", "real", "--n", "0"], names=["--n"])
    c("export", "--dtype f8", ["export", "--from", f"{MODELS}/gpt", "--to", p("ex", "x.safetensors"), "--dtype", "f8"], names=["--dtype"])
    c("export", "--from that does not exist", ["export", "--from", p("nowhere"), "--to", p("ex", "y.safetensors")], names=["nowhere"])
    write(p("logs", "empty", "log.jsonl"), b"")
    c("plots", "plot-logs of an empty log", ["plot-logs", p("logs", "empty"), "--out", p("logs", "x.png")], names=["log.jsonl"])
    write(p("logs", "garbage", "log.jsonl"), b"{not json\n")
    c("plots", "plot-logs of a garbage log", ["plot-logs", p("logs", "garbage"), "--out", p("logs", "y.png")], names=["log.jsonl"])
    c("plots", "summarize a folder without a run", ["summarize", p("logs")], names=["logs"])

    # ---- more commands: serve, bench, ablate, tokenizer train, classifier, fid, export, .pt, .npz
    c("serve", "--workers 0", ["serve", "--workers", "0", "--addr", "127.0.0.1:0"], names=["--workers"])
    c("serve", "--addr that is not an address", ["serve", "--addr", "nowhere:port"], names=["--addr"])
    c("serve", "--models without a dpar/ folder", ["serve", "--models", p("nowhere"), "--addr", "127.0.0.1:0"], names=["nowhere"])
    c("bench speed", "--sampling-curve 0", ["bench", "speed", "--no-models", "--sampling-curve", "0"], names=["--sampling-curve"])
    c("bench speed", "--sampling-curve x", ["bench", "speed", "--no-models", "--sampling-curve", "x"], names=["--sampling-curve"])
    c("bench speed", "--reps 0", ["bench", "speed", "--models", "bench", "--reps", "0"], names=["--reps"])
    c("bench speed", "--models unknown", ["bench", "speed", "--models", "huge"], names=["huge"])
    c("bench speed", "--batch-size 0", ["bench", "speed", "--models", "bench", "--batch-size", "0"], names=["--batch-size"])
    c("bench speed", "--torch that is not a Python", ["bench", "speed", "--models", "bench", "--reps", "1", "--torch", p("nowhere-python")], names=["nowhere-python"])
    c("bench", "no runs given", ["bench", "--train-codes", train_codes, "--test-codes", test_codes, "--out", p("bench")], names=["--gpt-run"])
    c("bench", "a --gpt-run that does not exist", ["bench", "--gpt-run", p("nowhere"), "--dpar-run", s.p("base/dpar"), "--train-codes", train_codes, "--test-codes", test_codes, "--out", p("bench")], names=["nowhere"])
    c("bench", "--samples 0", ["bench", "--gpt-run", s.p("base/gpt"), "--dpar-run", s.p("base/dpar"), "--train-codes", train_codes, "--test-codes", test_codes, "--samples", "0", "--out", p("bench")], names=["--samples"])
    c("bench", "--sample-batch 0", ["bench", "--gpt-run", s.p("base/gpt"), "--dpar-run", s.p("base/dpar"), "--train-codes", train_codes, "--test-codes", test_codes, "--sample-batch", "0", "--out", p("bench")], names=["--sample-batch"])
    c("bench device", "--reps 0", ["bench", "device", "--device", "cpu", "--quick", "--reps", "0", "--out", p("dev")], names=["--reps"])
    c("ablate", "--seeds x", ["ablate", "threshold", "--train-codes", train_codes, "--test-codes", test_codes, "--seeds", "x", "--out", p("abl")], names=["--seeds"])
    c("ablate", "--steps 0", ["ablate", "train", "--train-codes", train_codes, "--test-codes", test_codes, "--steps", "0", "--out", p("abl")], names=["--steps"])
    c("ablate", "--samples 0", ["ablate", "threshold", "--train-codes", train_codes, "--test-codes", test_codes, "--samples", "0", "--out", p("abl")], names=["--samples"])
    c("tokenizer train", "--steps 0", ["tokenizer", "train", "--steps", "0", "--out", p("tt0")], names=["--steps"])
    c("tokenizer train", "--batch-size 0", ["tokenizer", "train", "--batch-size", "0", "--steps", "1", "--out", p("tt1")], names=["--batch-size"])
    c("tokenizer train", "--codebook-size 1", ["tokenizer", "train", "--codebook-size", "1", "--steps", "1", "--out", p("tt2")], names=["codebook"])
    c("tokenizer train", "--lr nan", ["tokenizer", "train", "--lr", "nan", "--steps", "1", "--out", p("tt3")], names=["--lr"])
    c("tokenizer train", "--preset unknown", ["tokenizer", "train", "--preset", "vq99", "--steps", "1", "--out", p("tt4")], names=["vq99"])
    c("tokenizer train", "--val-images 0", ["tokenizer", "train", "--val-images", "0", "--steps", "1", "--out", p("tt5")], names=["--val-images"])
    c("eval", "train-classifier --steps 0", ["eval", "train-classifier", "--steps", "0", "--out", p("cls")], names=["--steps"])
    c("eval", "eval fid with nothing that exists", ["eval", "fid", "--inception", p("nowhere.pth"), "--samples", p("none.npz"), "--ref", p("none2.npz")], names=["nowhere.pth"])
    c("eval", "eval fid --batch 0", ["eval", "fid", "--inception", p("nowhere.pth"), "--samples", p("none.npz"), "--ref", p("none2.npz"), "--batch", "0"], names=["--batch"])
    def big_weight(h, b):
        name, info = first_tensor(h, "F16")
        a = info["data_offsets"][0]
        b[a:a + 2] = struct.pack("<e", 60000.0)
        return b
    f32 = p("ex", "f32")
    c("export", "to f32 (ok)", ["export", "--from", f"{MODELS}/gpt", "--to", f32 + "/model.safetensors", "--dtype", "f32"], expect="ok")
    c("export", "--to inside a folder that cannot be made", ["export", "--from", f"{MODELS}/gpt", "--to", "/proc/x/y.safetensors"], names=["y.safetensors"])
    c("export", "--from a shard (its integer tensors copied as they are)", ["export", "--from", f"{train_codes}/shard-00000.safetensors", "--to", p("ex", "shard.safetensors")], expect="ok")
    pt = os.path.join(ROOT, "tests/fixtures/vq16_tiny.pt")
    raw = open(pt, "rb").read()
    c("pt", "a .pt cut in half", ["tokenizer", "eval", "--tokenizer", write(p("pt", "half.pt"), raw[:len(raw) // 2]), "--tokenizer-preset", "vq16", "--max-images", "2"], names=["half.pt"])
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    c("pt", "a .pt with one byte flipped in a tensor", ["tokenizer", "eval", "--tokenizer", write(p("pt", "flip.pt"), bytes(flipped)), "--tokenizer-preset", "vq16", "--max-images", "2"], names=["flip.pt"])
    c("pt", "a .pt that is a safetensors file", ["sample", "--ckpt", write(p("pt", "st.pt"), open(f"{MODELS}/gpt/model.safetensors", "rb").read()), "--preset", "gpt-b", "--per-class", "1", "--out", p("pt", "o")], names=["st.pt"])
    c("npz", "eval samples on an npz of the wrong dtype", ["eval", "samples", "--codes", write(p("npz", "f.npz"), b"PK\x05\x06" + bytes(18))], names=["f.npz"])
    c("sample", "--ckpt the entropy model (unconditional)", ["sample", "--ckpt", f"{MODELS}/entropy", "--per-class", "1", "--out", p("sm", "e")], names=["entropy"])
    c("sample", "--ckpt the tokenizer", ["sample", "--ckpt", f"{MODELS}/tokenizer", "--per-class", "1", "--out", p("sm", "t")], names=["tokenizer"])
    c("sample", "--classes 3-1 (a reversed range)", ["sample", "--classes", "3-1", "--out", p("sm", "r")], names=["--classes"])
    c("sample", "--tokenizer of another model kind", ["sample", "--per-class", "1", "--tokenizer", f"{MODELS}/gpt", "--out", p("sm", "k")], names=["models/mnist/gpt"])
    c("train flags", "--preset unknown", g + shape + ["--preset", "gpt-z", "--out", out("pz")], names=["gpt-z"])
    c("train flags", "DPAR with a GPT preset", ["train", "--model", "dpar", *budget, *data, "--preset", "gpt-b", "--out", out("dg")], names=["gpt-b"])
    c("entropy train", "a DPAR preset", ["entropy", "train", "--codes", train_codes, "--preset", "dpar-b", "--out", out("ed")], names=["dpar-b"])
    c("train flags", "--flip on shards without a flip copy", g + shape + ["--flip", "--out", out("flip")], names=["flip"])
    c("plots", "plot-logs --x that no line has", ["plot-logs", s.p("base/gpt"), "--x", "nothing", "--out", p("logs", "z.png")], names=["nothing"])
    c("plots", "summarize a run with a broken config.json", ["summarize", bad], names=["config.json"])
    c("data", "data info --split that does not exist", ["data", "info", "--data", MNIST, "--split", "valid"], names=["valid"])

    # ---- read-only commands must not write into model folders
    tokdir = p("ro", "tokenizer")
    shutil.copytree(f"{MODELS}/tokenizer", tokdir, dirs_exist_ok=True)
    def state():
        return {f: open(os.path.join(tokdir, f), "rb").read() for f in sorted(os.listdir(tokdir))}
    listing = state()
    def nothing_written():
        now = state()
        changed = sorted(f for f in set(now) | set(listing) if now.get(f) != listing.get(f))
        return None if not changed else f"wrote into the tokenizer's folder: {changed}"
    c("read-only", "tokenizer eval leaves the model folder alone", ["tokenizer", "eval", "--tokenizer", tokdir, "--max-images", "8"], expect="ok", post=nothing_written)
    c("read-only", "tokenizer reconstruct leaves the model folder alone", ["tokenizer", "reconstruct", "--tokenizer", tokdir, "--n", "8", "--data", MNIST], expect="ok", post=nothing_written, cwd=p("ro"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/dpar"))
    ap.add_argument("--only", default="")
    ap.add_argument("--json")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()
    scratch = tempfile.mkdtemp(prefix="dpar-hostile-")
    s = Sweep(os.path.abspath(a.bin), scratch, a.timeout, a.only)
    build_bases(s)
    try:
        cases(s)
    finally:
        counts = {}
        for r in s.rows:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        print("| group | case | outcome | message |\n|---|---|---|---|")
        for r in s.rows:
            msg = r["message"].replace("|", "\\|")
            print(f"| {r['group']} | {r['case']} | {r['outcome']} | {msg} |")
        print("\n| outcome | cases |\n|---|---|")
        for k in ("ok", "error", "unnamed", "accepted", "refused", "panic", "abort", "hang", "broken"):
            if counts.get(k):
                print(f"| {k} | {counts[k]} |")
        print(f"| total | {len(s.rows)} |")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"counts": counts, "rows": s.rows}, f, indent=1)
        if not a.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
