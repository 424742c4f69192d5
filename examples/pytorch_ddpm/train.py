#!/usr/bin/env python3
"""Trains the example DDPM on synthetic coloured shapes and writes model.toml.

What it writes under --out (default ./ddpm-shapes):

    images/<class>/<class>-NNN.png   the training set: RGB 32x32 PNGs, one
                                     sub-folder per class (circle, cross,
                                     square, triangle), deterministic from --seed
    queries/<class>-NN.png           held-out images of the same kinds (other
                                     draws of the same generator), to ask about
    ckpt-SSSSSS.ts.pt                TorchScript checkpoints (torch.jit.script)
    model.toml                       the model description retrace reads
    train-stamp.json                 what produced the above (for --reuse)

Training is plain DDPM: eps-prediction, per-example mse, a linear beta
schedule (1e-4 .. 0.02, T = 1000), Adam with a constant learning rate.
Checkpoint c is saved after step s_c = round((c + 1) * steps / C); its weight
is w_c = lr * (s_c - s_{c-1}) (s_{-1} = 0), the learning rate times the
number of steps it stands for, as TracIn wants.

    python3 train.py --out DIR [--steps 300] [--seed 0] [--images-per-class 40]
                     [--checkpoints 2] [--queries 3] [--reuse]

--reuse leaves DIR alone when train-stamp.json says it was produced by the
same options and the same train.py and model.py, and every file listed there
still has its recorded sha256.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pngio  # noqa: E402
from model import make_model  # noqa: E402

CLASSES = ("circle", "cross", "square", "triangle")
SIZE = 32
T = 1000
BETA_START, BETA_END = 1e-4, 0.02


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def linear_alpha_bars() -> np.ndarray:
    """ᾱ_t in double: β_t = β_start + (β_end − β_start)·t/(T−1), ᾱ_t = Π (1 − β_i)."""
    t = np.arange(T, dtype=np.float64)
    betas = BETA_START + (BETA_END - BETA_START) * t / (T - 1)
    return np.cumprod(1.0 - betas)


def draw_shape(rng: np.random.Generator, kind: str) -> np.ndarray:
    """One RGB 32x32 uint8 image of a shape of `kind` on a plain background."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    background = rng.integers(0, 90, size=3)
    color = rng.integers(120, 256, size=3)
    cx, cy = rng.uniform(11, 21, size=2)
    r = rng.uniform(6, 10)
    dx, dy = xx - cx, yy - cy
    if kind == "circle":
        mask = dx * dx + dy * dy <= r * r
    elif kind == "square":
        mask = (np.abs(dx) <= r * 0.8) & (np.abs(dy) <= r * 0.8)
    elif kind == "cross":
        arm = r * 0.3
        mask = (((np.abs(dx) <= arm) & (np.abs(dy) <= r))
                | ((np.abs(dy) <= arm) & (np.abs(dx) <= r)))
    elif kind == "triangle":  # apex up, base at cy + r/2
        mask = (dy <= r * 0.5) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.577)
    else:
        raise ValueError(kind)
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    img[...] = background
    img[mask] = color
    return img


def make_images(root: str, per_class: int, seed: int, queries_dir: str,
                queries_per_class: int) -> list:
    """Writes the training folder and the held-out queries; returns the paths."""
    written = []
    for label, kind in enumerate(CLASSES):
        rng = np.random.default_rng([seed, label])
        os.makedirs(os.path.join(root, kind), exist_ok=True)
        for i in range(per_class):
            path = os.path.join(root, kind, f"{kind}-{i:03d}.png")
            pngio.write_png(path, draw_shape(rng, kind))
            written.append(path)
        # Held-out images continue the class's own stream after the training
        # ones: same distribution, never in the training set.
        os.makedirs(queries_dir, exist_ok=True)
        for i in range(queries_per_class):
            path = os.path.join(queries_dir, f"{kind}-{i:02d}.png")
            pngio.write_png(path, draw_shape(rng, kind))
            written.append(path)
    return written


def load_folder(root: str) -> torch.Tensor:
    """The folder as retrace reads it: classes and files in byte-wise name
    order, byte b -> b/127.5 − 1 in float32, [N, 3, 32, 32]."""
    images = []
    for kind in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, kind))):
            images.append(pngio.read_png(os.path.join(root, kind, name)))
    a = np.stack(images).astype(np.float32)
    a = a / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def write_model_toml(path: str, checkpoints: list, lr: float) -> None:
    lines = [
        "# Written by examples/pytorch_ddpm/train.py.",
        'format = "retrace-model"',
        "version = 1",
        "",
        "[model]",
        'kind = "torchscript"',
        "",
        "[image]",
        "channels = 3",
        f"height = {SIZE}",
        f"width = {SIZE}",
        "pixel_range = [-1.0, 1.0]",
        "",
        "[schedule]",
        'type = "linear"',
        f"timesteps = {T}",
        f"beta_start = {BETA_START!r}",
        f"beta_end = {BETA_END!r}",
        "",
        "[loss]",
        'type = "mse"',
        'prediction = "epsilon"',
    ]
    previous = 0
    for step, file, digest in checkpoints:
        lines += [
            "",
            "[[checkpoints]]",
            f'file = "{file}"',
            f"weight = {lr * (step - previous)!r}  # lr {lr!r} x {step - previous} steps",
            f'sha256 = "{digest}"',
            f"step = {step}",
        ]
        previous = step
    lines += ["", "[data]", 'source = "folder"', 'path = "images"', ""]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)


def stamp_of(args) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    return {
        "options": {"steps": args.steps, "seed": args.seed,
                    "images_per_class": args.images_per_class,
                    "checkpoints": args.checkpoints, "queries": args.queries,
                    "batch": args.batch, "lr": args.lr},
        "code": {name: sha256_file(os.path.join(here, name))
                 for name in ("train.py", "model.py", "pngio.py")},
    }


def reusable(out: str, want: dict) -> bool:
    try:
        with open(os.path.join(out, "train-stamp.json")) as f:
            have = json.load(f)
    except (OSError, ValueError):
        return False
    if have.get("options") != want["options"] or have.get("code") != want["code"]:
        return False
    for rel, digest in have.get("files", {}).items():
        path = os.path.join(out, rel)
        if not os.path.isfile(path) or sha256_file(path) != digest:
            return False
    return bool(have.get("files"))


def _fixed_hash_seed() -> None:
    """Re-runs this script with PYTHONHASHSEED=0 unless it already has it.

    torch.jit.script writes a module's constants in set-iteration order, which
    follows Python's per-process string hash seed, so without a fixed seed the
    same model gives differently ordered code (and another sha256) each run."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main() -> int:
    _fixed_hash_seed()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="ddpm-shapes", help="output directory")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the images, the initialization and training")
    parser.add_argument("--images-per-class", type=int, default=40)
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--queries", type=int, default=3,
                        help="held-out query images per class")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse", action="store_true",
                        help="keep --out if it was produced by the same options and code")
    args = parser.parse_args()
    if not 1 <= args.checkpoints <= args.steps:
        parser.error("--checkpoints must lie in 1..--steps")

    out = os.path.abspath(args.out)
    stamp = stamp_of(args)
    if args.reuse and reusable(out, stamp):
        print(f"train.py: {out} is up to date (train-stamp.json), reusing it")
        return 0
    torch.set_num_threads(args.threads)
    os.makedirs(out, exist_ok=True)
    stamp_path = os.path.join(out, "train-stamp.json")
    if os.path.exists(stamp_path):
        os.remove(stamp_path)

    images_dir = os.path.join(out, "images")
    queries_dir = os.path.join(out, "queries")
    for d in (images_dir, queries_dir):  # no stale files from a larger run
        if os.path.isdir(d):
            for dirpath, _, files in os.walk(d):
                for name in files:
                    os.remove(os.path.join(dirpath, name))
    written = make_images(images_dir, args.images_per_class, args.seed,
                          queries_dir, args.queries)
    x = load_folder(images_dir)
    n = x.shape[0]
    print(f"train.py: {n} training images ({len(CLASSES)} classes) in {images_dir}, "
          f"{args.queries * len(CLASSES)} queries in {queries_dir}")

    alpha_bars = linear_alpha_bars()
    signal = torch.from_numpy(np.sqrt(alpha_bars)).float()
    noise = torch.from_numpy(np.sqrt(1.0 - alpha_bars)).float()
    model = make_model(args.seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    save_at = [round((c + 1) * args.steps / args.checkpoints)
               for c in range(args.checkpoints)]
    checkpoints = []
    start = time.time()
    running = None
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        t = torch.randint(0, T, (args.batch,), generator=gen)
        eps = torch.randn(args.batch, 3, SIZE, SIZE, generator=gen)
        x0 = x[idx]
        x_t = signal[t].view(-1, 1, 1, 1) * x0 + noise[t].view(-1, 1, 1, 1) * eps
        loss = ((model(x_t, t) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps:
            print(f"train.py: step {step}/{args.steps}  loss {running:.4f}  "
                  f"{time.time() - start:.0f} s", flush=True)
        if step in save_at:
            name = f"ckpt-{step:06d}.ts.pt"
            path = os.path.join(out, name)
            model.eval()
            torch.jit.script(model).save(path + ".tmp")
            model.train()
            os.replace(path + ".tmp", path)
            checkpoints.append((step, name, sha256_file(path)))
    toml_path = os.path.join(out, "model.toml")
    write_model_toml(toml_path, checkpoints, args.lr)
    files = {os.path.relpath(p, out): sha256_file(p) for p in written}
    for _, name, digest in checkpoints:
        files[name] = digest
    files["model.toml"] = sha256_file(toml_path)
    stamp["files"] = files
    with open(stamp_path + ".tmp", "w") as f:
        json.dump(stamp, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(stamp_path + ".tmp", stamp_path)
    print(f"train.py: wrote {toml_path} with {len(checkpoints)} checkpoints "
          f"(steps {', '.join(str(s) for s, _, _ in checkpoints)}) "
          f"in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
