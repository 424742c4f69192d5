#!/usr/bin/env python3
"""Interoperability test of the retrace store format against an independent
Python implementation (numpy, json, struct, hashlib only; no project code).

(a) The C++ tool writes stores (F16, BF16, F32); this script parses them from
    the bytes up and checks every value against the formulas below.
(b) This script writes a store of its own (F16, different dimensions, its own
    tensor order and header formatting) that the C++ reader must accept with
    every value intact; damaged copies of it must be refused.

The formulas mirror tests/server/store/store_test_data.h: every value is a
function of (seed, field, position) through splitmix64's output function.

Usage: store_interop_test.py --tool PATH/store_interop_tool --workdir DIR
"""
import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

try:
    import numpy as np
except ImportError:
    print("numpy is not available: skipping")
    sys.exit(77)

U64 = np.uint64
FIELD_VECTOR, FIELD_NORM, FIELD_LABEL, FIELD_TRACIN, FIELD_RETRAC, FIELD_TIMESTEP = range(6)

failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
        print("FAIL:", message)


# --- the data formulas -------------------------------------------------------

def mix(x):
    """splitmix64 output function on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> U64(30))
        x = x * U64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> U64(27))
        x = x * U64(0x94D049BB133111EB)
        x = x ^ (x >> U64(31))
    return x


def field_hash(seed, field, positions):
    positions = np.asarray(positions, dtype=U64)
    with np.errstate(over="ignore"):
        return mix(U64(seed) ^ mix(positions * U64(8) + U64(field)))


def expected_arrays(seed, first, count, C, S, D, T, replay):
    """All tensors of samples [first, first + count) as float32 / int arrays."""
    n = np.arange(first, first + count, dtype=np.int64)
    flat_v = np.arange(first * C * S * D, (first + count) * C * S * D, dtype=np.int64)
    k = (field_hash(seed, FIELD_VECTOR, flat_v) % U64(131073)).astype(np.int64) - 65536
    vectors = (k.astype(np.float32) / np.float32(65536)).reshape(count, C, S, D)
    flat_n = np.arange(first * C * S, (first + count) * C * S, dtype=np.int64)
    norms = ((field_hash(seed, FIELD_NORM, flat_n) % U64(65536)).astype(np.float32)
             / np.float32(256)).reshape(count, C, S)
    sample_ids = 5000000000 + 3 * n
    labels = (field_hash(seed, FIELD_LABEL, n) % U64(10)).astype(np.int32)
    si = np.stack([
        ((field_hash(seed, f, n) % U64(65536)).astype(np.int64) - 32768).astype(np.float32)
        / np.float32(128) for f in (FIELD_TRACIN, FIELD_RETRAC)], axis=1)
    out = {"vectors": vectors, "norms": norms, "sample_ids": sample_ids, "labels": labels,
           "self_influence": si}
    if replay:
        flat_t = np.arange(first * C, (first + count) * C, dtype=np.int64)
        out["train_timesteps"] = (field_hash(seed, FIELD_TIMESTEP, flat_t) % U64(T)).astype(
            np.int32).reshape(count, C)
    return out


def encode_bits(values_f32, dtype):
    """Bit patterns of float32 values stored as dtype, round to nearest even."""
    if dtype == "F32":
        return values_f32.astype(np.float32).view(np.uint32)
    if dtype == "F16":
        return values_f32.astype(np.float16).view(np.uint16)
    if dtype == "BF16":
        u = values_f32.astype(np.float32).view(np.uint32).astype(np.uint64)
        return ((u + U64(0x7FFF) + ((u >> U64(16)) & U64(1))) >> U64(16)).astype(np.uint16)
    raise ValueError(dtype)


# --- safetensors -------------------------------------------------------------

NUMPY_DTYPES = {"F16": "<u2", "BF16": "<u2", "F32": "<f4", "I32": "<i4", "I64": "<i8"}
ELEMENT_SIZE = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I64": 8}


def read_safetensors(path):
    data = open(path, "rb").read()
    (length,) = struct.unpack("<Q", data[:8])
    header_bytes = data[8:8 + length]
    check((8 + length) % 8 == 0, f"{path}: data section starts at {8 + length}, not 8-aligned")
    stripped = header_bytes.rstrip(b" ")
    check(stripped.endswith(b"}"), f"{path}: header padding is not spaces")
    header = json.loads(header_bytes)
    metadata = header.pop("__metadata__", {})
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    offset = 0
    tensors = {}
    for name, info in entries:
        begin, end = info["data_offsets"]
        check(begin == offset, f"{path}: tensor {name} starts at {begin}, expected {offset}")
        count = int(np.prod(info["shape"], dtype=np.int64))
        check(end - begin == count * ELEMENT_SIZE[info["dtype"]], f"{path}: {name} size")
        check((8 + length + begin) % ELEMENT_SIZE[info["dtype"]] == 0,
              f"{path}: {name} misaligned")
        arr = np.frombuffer(data, dtype=NUMPY_DTYPES[info["dtype"]], count=count,
                            offset=8 + length + begin).reshape(info["shape"])
        tensors[name] = (info["dtype"], arr)
        offset = end
    check(8 + length + offset == len(data), f"{path}: data section does not end the file")
    return tensors, metadata


def write_safetensors(path, tensors, order):
    """tensors: name -> (dtype, array); written in `order` with Python's own
    JSON formatting (insertion order, ', ' separators) and no metadata."""
    header, blobs, offset = {}, [], 0
    for name in order:
        dtype, arr = tensors[name]
        blob = np.ascontiguousarray(arr).astype(NUMPY_DTYPES[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * ((8 - (8 + len(text)) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def sha256_file(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --- (a) read stores written by C++ -------------------------------------------

def check_cpp_store(directory, dtype):
    manifest = json.load(open(os.path.join(directory, "manifest.json")))
    where = f"[{dtype}]"
    check(manifest["format"] == "retrace-store", f"{where} format")
    check(manifest["format_version"] == 1, f"{where} format_version")
    check(manifest["dtype"] == dtype, f"{where} dtype {manifest['dtype']}")
    check(len(manifest["store_id"]) == 64, f"{where} store_id")
    C = len(manifest["model"]["checkpoints"])
    edges = manifest["buckets"]["edges"]
    replay = manifest["buckets"]["replay"]
    B = len(edges) - 1
    S = B + (1 if replay else 0)
    D = manifest["projection"]["dim"]
    T = manifest["noise_schedule"]["timesteps"]
    N = manifest["num_samples"]
    seed = manifest["dataset"]["provenance"]["seed"]
    check((C, B, S, D, N, seed) == (2, 3, 4, 12, 37, 7), f"{where} dimensions {(C, B, S, D, N)}")
    check(manifest["samples_per_shard"] == 10, f"{where} samples_per_shard")
    check(manifest["projection"]["seed"] == 0x9E3779B97F4A7C15, f"{where} projection.seed")
    check([s["count"] for s in manifest["shards"]] == [10, 10, 10, 7], f"{where} shard counts")

    all_norms = []
    first = 0
    for i, shard in enumerate(manifest["shards"]):
        path = os.path.join(directory, shard["file"])
        check(shard["file"] == f"shard-{i:05d}.safetensors", f"{where} shard name {shard['file']}")
        check(shard["first"] == first, f"{where} shard {i} first")
        check(sha256_file(path) == shard["sha256"], f"{where} shard {i} sha256")
        tensors, _ = read_safetensors(path)
        count = shard["count"]
        want = expected_arrays(seed, first, count, C, S, D, T, replay)
        shapes = {"vectors": [count, C, S, D], "norms": [count, C, S], "sample_ids": [count],
                  "labels": [count], "self_influence": [count, 2],
                  "train_timesteps": [count, C]}
        dtypes = {"vectors": dtype, "norms": "F32", "sample_ids": "I64", "labels": "I32",
                  "self_influence": "F32", "train_timesteps": "I32"}
        check(set(tensors) == set(shapes), f"{where} shard {i} tensors {sorted(tensors)}")
        for name, (tdtype, arr) in tensors.items():
            check(tdtype == dtypes[name], f"{where} shard {i} {name} dtype {tdtype}")
            check(list(arr.shape) == shapes[name], f"{where} shard {i} {name} shape {arr.shape}")
        stored_bits = tensors["vectors"][1]
        if dtype == "F32":
            stored_bits = stored_bits.view(np.uint32)
        expected_bits = encode_bits(want["vectors"], dtype)
        bad = np.count_nonzero(stored_bits != expected_bits)
        check(bad == 0, f"{where} shard {i}: {bad} vector elements differ")
        for name in ("norms", "sample_ids", "labels", "self_influence", "train_timesteps"):
            check(np.array_equal(tensors[name][1], want[name]), f"{where} shard {i} {name}")
        all_norms.append(tensors["norms"][1].astype(np.float64))
        first += count
    check(first == N, f"{where} shards hold {first} samples")

    norms = np.concatenate(all_norms)  # [N, C, S]
    stats = manifest["diagnostics"]["norm_stats"]
    check(stats["num_samples"] == N, f"{where} norm_stats.num_samples")
    for key, value in (("mean", norms.mean(axis=0)), ("median", np.median(norms, axis=0)),
                       ("p95", np.percentile(norms, 95, axis=0))):
        got = np.array(stats[key], dtype=np.float64)
        check(got.shape == (C, S) and np.allclose(got, value, rtol=1e-12, atol=0),
              f"{where} norm_stats.{key}: {got} vs {value}")
    check(manifest["diagnostics"].get("spearman") == [-0.5, 0.25], f"{where} caller diagnostics")


# --- (b) write a store the C++ reader must accept ------------------------------

def write_python_store(directory):
    os.makedirs(directory, exist_ok=True)
    seed, C, edges, D, T, N, per_shard = 11, 3, [0, 100, 500, 1000], 8, 1000, 23, 8
    S = len(edges) - 1 + 1  # three buckets and the replay slot
    # Element size descending; within a size, an order the C++ writer does not use.
    order = ["sample_ids", "self_influence", "norms", "train_timesteps", "labels", "vectors"]
    shards = []
    for i, first in enumerate(range(0, N, per_shard)):
        count = min(per_shard, N - first)
        a = expected_arrays(seed, first, count, C, S, D, T, True)
        tensors = {
            "vectors": ("F16", encode_bits(a["vectors"], "F16")),
            "norms": ("F32", a["norms"]),
            "sample_ids": ("I64", a["sample_ids"]),
            "labels": ("I32", a["labels"]),
            "self_influence": ("F32", a["self_influence"]),
            "train_timesteps": ("I32", a["train_timesteps"]),
        }
        name = f"shard-{i:05d}.safetensors"
        write_safetensors(os.path.join(directory, name), tensors, order)
        shards.append({"file": name, "first": first, "count": count,
                       "sha256": sha256_file(os.path.join(directory, name))})
    manifest = {
        "format": "retrace-store",
        "format_version": 1,
        "store_id": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest(),
        "model": {"architecture": "python-writer", "checkpoints": [
            {"file": f"ckpt{c}.pt", "sha256": hashlib.sha256(b"ckpt%d" % c).hexdigest(),
             "weight": 1.0, "step": 100 * c} for c in range(C)]},
        "noise_schedule": {"type": "linear", "timesteps": T, "beta_start": 0.0001,
                           "beta_end": 0.02},
        "loss": "l1",
        "buckets": {"edges": edges, "replay": True},
        "projection": {"type": "rademacher", "dim": D, "sparsity": 0, "seed": 5,
                       "param_regex": "", "input_dim": 1000},
        "grad_timesteps": 2,
        "dtype": "F16",
        "samples_per_shard": per_shard,
        "num_samples": N,
        "dataset": {"name": "python", "root": "/nowhere", "provenance": {"seed": seed}},
        "shards": shards,
        "diagnostics": {"note": "written by store_interop_test.py"},
    }
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def run_tool(tool, *args):
    return subprocess.run([tool, *args], capture_output=True, text=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)

    for dtype in ("F16", "BF16", "F32"):
        directory = os.path.join(args.workdir, f"cpp-{dtype}")
        result = run_tool(args.tool, "write", directory, dtype)
        check(result.returncode == 0, f"tool write {dtype}: {result.stderr}")
        if result.returncode == 0:
            check_cpp_store(directory, dtype)

    # Two C++ builds of the same data are byte-identical.
    again = os.path.join(args.workdir, "cpp-F16-again")
    run_tool(args.tool, "write", again, "F16")
    first = os.path.join(args.workdir, "cpp-F16")
    for name in sorted(os.listdir(first)):
        check(open(os.path.join(first, name), "rb").read() ==
              open(os.path.join(again, name), "rb").read(), f"rebuild differs in {name}")

    py_dir = os.path.join(args.workdir, "python-F16")
    write_python_store(py_dir)
    result = run_tool(args.tool, "check", py_dir)
    check(result.returncode == 0 and result.stdout.startswith("ok: 23 samples in 3 shards"),
          f"C++ check of the Python store: rc {result.returncode}: {result.stdout}{result.stderr}")
    print(result.stdout.strip())

    # The C++ reader also accepts its own stores through the same checker.
    result = run_tool(args.tool, "check", os.path.join(args.workdir, "cpp-BF16"))
    check(result.returncode == 0, f"C++ check of the BF16 store: {result.stderr}")

    # A flipped byte in the Python store is refused, naming the file.
    damaged = os.path.join(args.workdir, "python-F16-damaged")
    shutil.copytree(py_dir, damaged)
    path = os.path.join(damaged, "shard-00001.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-2] ^= 0x01
    open(path, "wb").write(bytes(data))
    result = run_tool(args.tool, "check", damaged)
    check(result.returncode == 2 and "checksum mismatch" in result.stderr
          and "shard-00001.safetensors" in result.stderr,
          f"damaged store: rc {result.returncode}: {result.stderr}")

    # An unknown format version is refused, naming the field.
    future = os.path.join(args.workdir, "python-F16-v2")
    shutil.copytree(py_dir, future)
    manifest_path = os.path.join(future, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["format_version"] = 2
    json.dump(manifest, open(manifest_path, "w"))
    result = run_tool(args.tool, "check", future)
    check(result.returncode == 2 and "format_version" in result.stderr,
          f"version 2 store: rc {result.returncode}: {result.stderr}")

    if failures:
        print(f"{len(failures)} failures")
        return 1
    print("store interop: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
