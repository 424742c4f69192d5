#!/usr/bin/env python3
"""Exports a diffusers UNet2DModel as a TorchScript module that retrace can load.

retrace loads user models with torch::jit::load and calls
    forward(x_t: Tensor[B, C, H, W] float32, t: Tensor[B] int64) -> Tensor  (eps)
This script wraps a diffusers UNet2DModel so that forward returns the predicted
noise tensor itself (diffusers returns an output object), traces it on an
example batch, checks the traced module against the original on a second batch
with other timesteps, and saves it.

Needs: torch and diffusers (pip install diffusers). retrace itself does not.

    python3 scripts/export_torchscript.py --model google/ddpm-cifar10-32 \
        --out unet.ts.pt [--subfolder unet] [--checkpoint-dir DIR]

--model takes a local directory or a hub name (whatever
UNet2DModel.from_pretrained accepts). To attribute over several training
checkpoints, export each checkpoint to its own file: retrace's store build
records each file's sha256 and weight w_c.
"""
import argparse
import sys

import torch


class EpsWrapper(torch.nn.Module):
    """forward(x_t, t) -> eps around a diffusers UNet2DModel."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, return_dict=False)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="local directory or hub name of a UNet2DModel")
    parser.add_argument("--subfolder", default=None,
                        help="subfolder holding the UNet (e.g. 'unet' in a pipeline)")
    parser.add_argument("--out", required=True, help="output TorchScript file")
    parser.add_argument("--batch", type=int, default=2,
                        help="example batch size used for tracing")
    args = parser.parse_args()

    try:
        from diffusers import UNet2DModel
    except ImportError:
        print("export_torchscript.py needs diffusers: pip install diffusers",
              file=sys.stderr)
        return 2

    unet = UNet2DModel.from_pretrained(args.model, subfolder=args.subfolder)
    unet.eval()
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    shape = (args.batch, cfg.in_channels, size, size)
    wrapper = EpsWrapper(unet).eval()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    t = torch.randint(0, 1000, (args.batch,), generator=gen, dtype=torch.int64)
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, (x, t), check_trace=False)
        # Tracing records one path through the model: check that it still
        # matches on other inputs and timesteps before saving.
        x2 = torch.randn(shape, generator=gen)
        t2 = torch.randint(0, 1000, (args.batch,), generator=gen, dtype=torch.int64)
        want = wrapper(x2, t2)
        got = traced(x2, t2)
    err = (want - got).abs().max().item()
    scale = want.abs().max().item()
    if err > 1e-4 * max(scale, 1.0):
        print(f"traced module differs from the original: max error {err:g}",
              file=sys.stderr)
        return 1
    traced.save(args.out)
    params = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    print(f"wrote {args.out}: input [B, {cfg.in_channels}, {size}, {size}], "
          f"{params} trainable parameters, max trace error {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
