#!/usr/bin/env python3
"""A small noise-prediction UNet for RGB 32x32 images, in plain PyTorch.

The example model of examples/pytorch_ddpm: about 180k parameters, so that
per-sample gradients (what retrace stores, one per sample, checkpoint and
timestep bucket) cost a few milliseconds each on a laptop CPU. It is
scriptable with torch.jit.script and has the interface retrace loads:

    forward(x_t: Tensor[B, 3, 32, 32] float32, t: Tensor[B] int64) -> eps

Layout: sinusoidal time embedding -> MLP; conv_in; a residual block at 32x32;
a strided convolution down to 16x16; a residual block there; nearest-neighbour
upsampling and a convolution back to 32x32; a residual block over the
concatenation with the 32x32 skip; GroupNorm, SiLU, conv_out. Every residual
block is GroupNorm -> SiLU -> conv3x3 (+ time projection) -> GroupNorm ->
SiLU -> conv3x3, plus a 1x1 shortcut when the widths differ.

    python3 model.py --export untrained.ts.pt [--seed N]

saves an untrained scripted copy (torch.jit.script(model).save(path)).
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 8


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps t [B] -> [B, dim] float32."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=t.device)
        * (-math.log(10000.0) / half))
    args = t.to(torch.float32).unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(GROUPS, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.skip = nn.Conv2d(c_in, c_out, 1)
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb).unsqueeze(-1).unsqueeze(-1)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class TinyUNet(nn.Module):
    """eps_theta(x_t, t) for [B, channels, 32, 32] images."""

    def __init__(self, channels: int = 3, width: int = 32, t_dim: int = 64):
        super().__init__()
        self.t_freq = 32
        self.time_mlp1 = nn.Linear(self.t_freq, t_dim)
        self.time_mlp2 = nn.Linear(t_dim, t_dim)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.block_hi = ResBlock(width, width, t_dim)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.block_lo = ResBlock(2 * width, 2 * width, t_dim)
        self.up = nn.Conv2d(2 * width, width, 3, padding=1)
        self.block_out = ResBlock(2 * width, width, t_dim)
        self.norm_out = nn.GroupNorm(GROUPS, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = timestep_embedding(t, self.t_freq)
        temb = self.time_mlp2(F.silu(self.time_mlp1(temb)))
        h0 = self.conv_in(x_t)
        h1 = self.block_hi(h0, temb)
        h = self.block_lo(self.down(h1), temb)
        h = self.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.block_out(torch.cat([h, h1], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))


def make_model(seed: int = 0) -> TinyUNet:
    """A freshly initialized model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return TinyUNet()


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
    parser.add_argument("--export", metavar="OUT.pt", required=True,
                        help="write an untrained TorchScript copy here")
    parser.add_argument("--seed", type=int, default=0,
                        help="initialization seed (default 0)")
    args = parser.parse_args()
    model = make_model(args.seed).eval()
    scripted = torch.jit.script(model)
    # The scripted module must compute what the eager one does.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    t = torch.tensor([0, 999], dtype=torch.int64)
    with torch.no_grad():
        err = (scripted(x, t) - model(x, t)).abs().max().item()
    if err > 1e-5:
        print(f"scripted model differs from the eager one: {err:g}",
              file=sys.stderr)
        return 1
    scripted.save(args.export)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.export}: {params} parameters, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
