#!/usr/bin/python3
"""Writes the fuzz targets' seed corpora into corpus/<target>/.

    make_corpus.py --pb-dir BUILD/client/python \
                   --store-tool BUILD/tests/server/store/store_interop_tool

Seeds are small valid inputs of each kind (and a few near-misses), so the
fuzzers start from the formats' structure: PNG/JPEG files of every accepted
kind and of each refused oddity (Pillow), serialized requests (the generated
protobuf module), a store's manifest.json and shard (store_interop_tool),
model descriptions and retraced.toml files. The output is committed; rerun
this when a format changes.
"""
import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def write(target, name, data):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def image_bytes(image, fmt, **options):
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def images():
    gray = Image.frombytes("L", (8, 8), bytes((x * 29 + 7) % 256 for x in range(64)))
    rgb = Image.merge("RGB", (gray, gray.transpose(Image.FLIP_LEFT_RIGHT), gray))
    t = "image_decode_fuzz"
    write(t, "gray.png", image_bytes(gray, "PNG"))
    write(t, "rgb.png", image_bytes(rgb, "PNG"))
    write(t, "rgba.png", image_bytes(rgb.convert("RGBA"), "PNG"))
    write(t, "gray_alpha.png", image_bytes(gray.convert("LA"), "PNG"))
    write(t, "palette.png", image_bytes(rgb.convert("P"), "PNG"))
    write(t, "one_bit.png", image_bytes(gray.convert("1"), "PNG"))
    write(t, "optimized.png", image_bytes(rgb, "PNG", optimize=True))
    write(t, "sixteen_bit.png", image_bytes(gray.convert("I;16"), "PNG"))
    write(t, "text_chunk.png", image_bytes(gray, "PNG", pnginfo=_text_info()))
    write(t, "animated.png", image_bytes(rgb, "PNG", save_all=True,
                                          append_images=[gray.convert("RGB")]))
    write(t, "gray.jpg", image_bytes(gray, "JPEG", quality=90))
    write(t, "rgb.jpg", image_bytes(rgb, "JPEG", quality=90))
    write(t, "progressive.jpg", image_bytes(rgb, "JPEG", progressive=True))
    write(t, "cmyk.jpg", image_bytes(rgb.convert("CMYK"), "JPEG"))
    write(t, "wrong_size.png", image_bytes(gray.resize((9, 7)), "PNG"))


def _text_info():
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", "seed")
    return info


def requests(pb_dir):
    sys.path.insert(0, pb_dir)
    from retrace.v1 import attribution_pb2 as pb
    gray = Image.frombytes("L", (8, 8), bytes((x * 29 + 7) % 256 for x in range(64)))
    t = "attribute_request_fuzz"
    r = pb.AttributeRequest(image=image_bytes(gray, "PNG"), top_k=3,
                            opponents=True, include_breakdown=True,
                            request_id="seed-image")
    write(t, "image.pb", r.SerializeToString())
    r = pb.AttributeRequest(top_k=5, methods=[pb.TRACIN], seed=7,
                            query_timesteps=1, query_noise_draws=1)
    r.tensor.shape.extend([8, 8])
    r.tensor.values.extend([(i % 17) / 8.5 - 1 for i in range(64)])
    write(t, "tensor.pb", r.SerializeToString())
    # The store of the target: C = 2, 2 buckets (+ replay), D = 12.
    r = pb.AttributeRequest(top_k=4, pairing=pb.REPLAY, checkpoints=[1],
                            buckets=[0], methods=[pb.RETRAC, pb.TRACIN])
    v = r.query_vectors
    v.num_checkpoints, v.num_slots, v.dim = 2, 2, 12
    v.raw.extend([(i % 7) - 3.0 for i in range(48)])
    v.unit.extend([((i % 5) - 2) / 4.0 for i in range(48)])
    write(t, "query_vectors.pb", r.SerializeToString())
    s = pb.SelfInfluenceRequest(method=pb.TRACIN, page_size=3,
                                page_token="si1:0:3")
    write(t, "self_influence.pb", s.SerializeToString())
    write(t, "empty.pb", b"")
    t = "page_token_fuzz"
    for name, token in [("first", "si1:0:0"), ("retrac", "si1:1:100"),
                        ("end", "si1:1:1000"), ("negative", "si1:0:-1"),
                        ("junk", "si1:x:1")]:
        write(t, name, token)


def store(tool):
    t = "store_headers_fuzz"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([tool, "write", tmp + "/s", "fp16"], check=True)
        names = sorted(os.listdir(tmp + "/s"))
        with open(os.path.join(tmp, "s", "manifest.json"), "rb") as f:
            write(t, "manifest.json", b"\x00" + f.read())
        shard = [n for n in names if n.endswith(".safetensors")][0]
        with open(os.path.join(tmp, "s", shard), "rb") as f:
            write(t, "shard.safetensors", b"\x01" + f.read())


def descriptions():
    t = "model_description_fuzz"
    write(t, "torchscript.toml", """\
format = "retrace-model"
version = 1

[model]
kind = "torchscript"

[image]
channels = 3
height = 32
width = 32
pixel_range = [0.0, 1.0]

[schedule]
type = "linear"
timesteps = 1000
beta_start = 0.0001
beta_end = 0.02

[loss]
type = "mse"
prediction = "epsilon"

[[checkpoints]]
file = "ckpt-000150.ts.pt"
weight = 0.3
step = 150

[[checkpoints]]
file = "ckpt-000300.ts.pt"
weight = 0.7
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"

[data]
source = "folder"
path = "images"
""")
    write(t, "builtin.toml", """\
format = "retrace-model"
version = 1

[model]
kind = "builtin-unet"
base_channels = 16
channel_mults = [1, 2, 4]
attention = true
norm_groups = 8

[image]
channels = 1
height = 28
width = 28

[schedule]
type = "cosine"
timesteps = 1000

[loss]
type = "l1"

[[checkpoints]]
file = "a.pt"
weight = 1.0

[data]
source = "mixture"
spec = "fashion-mnist:train:classes=0 + mnist:classes=0:fraction=0.038"
seed = 0
""")
    write(t, "betas.toml", """\
format = "retrace-model"
version = 1
[model]
kind = "torchscript"
[image]
channels = 1
height = 8
width = 8
[schedule]
type = "betas"
values = [0.1, 0.2, 0.3]
[[checkpoints]]
file = "a.pt"
weight = 2.5
""")
    t = "retraced_config_fuzz"
    shutil.copy(os.path.join(ROOT, "deploy", "retraced.toml"),
                os.path.join(HERE, "corpus", t, "deploy.toml"))
    write(t, "small.toml", 'listen = "127.0.0.1:0"\nmax-batch = 8\n'
          'max-queue-delay-us = 500\nthreads = 2\nthumbnails = false\n')
    write(t, "bad_key.toml", 'store = "/s"\nno-such-key = 1\n')


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pb-dir", required=True)
    p.add_argument("--store-tool", required=True)
    a = p.parse_args()
    shutil.rmtree(os.path.join(HERE, "corpus"), ignore_errors=True)
    for t in ["model_description_fuzz", "retraced_config_fuzz"]:
        os.makedirs(os.path.join(HERE, "corpus", t), exist_ok=True)
    images()
    requests(a.pb_dir)
    store(a.store_tool)
    descriptions()


if __name__ == "__main__":
    main()
