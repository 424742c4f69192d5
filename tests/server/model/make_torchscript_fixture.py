#!/usr/bin/env python3
"""Writes the reference data for torchscript_model_test.

Builds a tiny noise-prediction network with a fixed seed, scripts and saves it,
then computes with PyTorch, independently of retrace's C++ code:
  cosine-schedule ᾱ_t in float64, x_t = √ᾱ_t·x + √(1−ᾱ_t)·ε,
  eps_hat = model(x_t, t), per-example mse loss, and the gradient of the summed
  loss with respect to every parameter.
Everything is written to OUT_DIR as raw little-endian arrays (float32, int64
for t) plus manifest.json listing names, shapes and files.

It also writes the files that TorchScriptModel::Create must refuse (the
"refused" entry of the manifest): a copy of model.pt whose version record says
99 (and a copy rewritten the same way with the true version, which must
load), a torch.save state_dict, modules whose forward takes one or three inputs
or returns a tuple, one whose output is smaller than its input and one that
raises for 1-channel images. manifest.json records the file-format version
that this PyTorch wrote into model.pt ("format_version", read from the
archive) and torch.__version__.

usage: make_torchscript_fixture.py OUT_DIR
"""
import json
import math
import os
import sys
import zipfile
from typing import Tuple

import numpy as np
import torch

SEED = 1234
BATCH = 3
SIZE = 8
NUM_TIMESTEPS = 1000


class TinyEps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.time = torch.nn.Linear(8, 4)
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.conv2 = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(torch.arange(4, dtype=torch.float32) * (-math.log(1000.0) / 4))
        args = t.to(torch.float32).unsqueeze(1) * freqs.unsqueeze(0)
        temb = self.time(torch.cat([torch.sin(args), torch.cos(args)], dim=1))
        h = self.conv1(x_t) + temb.unsqueeze(-1).unsqueeze(-1)
        return self.conv2(torch.nn.functional.silu(self.norm(h)))


class OneInput(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ThreeInputs(torch.nn.Module):
    def forward(self, x_t: torch.Tensor, t: torch.Tensor,
                label: torch.Tensor) -> torch.Tensor:
        return x_t + label


class ReturnsTuple(torch.nn.Module):
    def forward(self, x_t: torch.Tensor,
                t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return x_t, t


class Shrinks(torch.nn.Module):
    """Returns half the height and width of its input."""

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x_t, 2)


class WantsRgb(torch.nn.Module):
    """A convolution over 3 channels: 1-channel images make it raise."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x_t)


def archive_version(path):
    """The file-format version record of a TorchScript zip archive."""
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist()
                 if n.endswith("/.data/version") or n.endswith("/version")]
        return int(z.read(sorted(names)[0]).decode().strip())


def rewrite_version(src, dst, version):
    """Copies the archive src to dst with its version record replaced; every
    other entry keeps its name, bytes and compression (torch stores data
    uncompressed and reads it in place)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/version"):
                data = f"{version}\n".encode()
            zout.writestr(info, data, compress_type=info.compress_type)


def write_refused(out_dir):
    """The files Create must refuse, by the thing it must name."""
    files = {}

    def save_script(name, module):
        torch.jit.script(module).save(os.path.join(out_dir, name))
        return name

    rewrite_version(os.path.join(out_dir, "model.pt"),
                    os.path.join(out_dir, "version99.pt"), 99)
    files["version99"] = "version99.pt"
    # The same rewrite keeping the version: must load (the copy is sound).
    rewrite_version(os.path.join(out_dir, "model.pt"),
                    os.path.join(out_dir, "rewritten.pt"),
                    archive_version(os.path.join(out_dir, "model.pt")))
    torch.save(TinyEps().state_dict(), os.path.join(out_dir, "state_dict.pt"))
    files["state_dict"] = "state_dict.pt"
    files["one_input"] = save_script("one_input.pt", OneInput())
    files["three_inputs"] = save_script("three_inputs.pt", ThreeInputs())
    files["returns_tuple"] = save_script("returns_tuple.pt", ReturnsTuple())
    files["shrinks"] = save_script("shrinks.pt", Shrinks())
    files["wants_rgb"] = save_script("wants_rgb.pt", WantsRgb())
    return files


def cosine_alpha_bars(steps):
    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    out, product = [], 1.0
    for t in range(steps):
        beta = min(1.0 - f((t + 1) / steps) / f(t / steps), 0.999)
        product *= 1.0 - beta
        out.append(product)
    return np.array(out, dtype=np.float64)


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(SEED)
    model = torch.jit.script(TinyEps())
    model.save(os.path.join(out_dir, "model.pt"))

    x = torch.rand(BATCH, 1, SIZE, SIZE) * 2 - 1
    eps = torch.randn(BATCH, 1, SIZE, SIZE)
    t = torch.tensor([0, 417, 999], dtype=torch.int64)
    abar = torch.from_numpy(cosine_alpha_bars(NUM_TIMESTEPS))[t]
    signal = abar.sqrt().to(torch.float32).view(-1, 1, 1, 1)
    noise = (1 - abar).sqrt().to(torch.float32).view(-1, 1, 1, 1)
    x_t = signal * x + noise * eps
    eps_hat = model(x_t, t)
    loss = ((eps - eps_hat) ** 2).reshape(BATCH, -1).mean(dim=1)
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    grads = torch.autograd.grad(loss.sum(), params)

    def dump(name, tensor, dtype=np.float32):
        path = name + ".bin"
        tensor.detach().numpy().astype(dtype).tofile(os.path.join(out_dir, path))
        return {"file": path, "shape": list(tensor.shape)}

    manifest = {
        "seed": SEED,
        "torch_version": torch.__version__,
        "format_version": archive_version(os.path.join(out_dir, "model.pt")),
        "refused": write_refused(out_dir),
        "rewritten": "rewritten.pt",
        "x": dump("x", x),
        "eps": dump("eps", eps),
        "t": dump("t", t, np.int64),
        "x_t": dump("x_t", x_t),
        "eps_hat": dump("eps_hat", eps_hat),
        "loss": dump("loss", loss),
        "parameters": [
            dict(name=name, **dump("grad." + name, g)) for name, g in zip(names, grads)
        ],
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
