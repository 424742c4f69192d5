#!/usr/bin/env python3
"""Checks a retrace store and retraced's scores against full-dimensional gradients.

An independent re-implementation (Python, PyTorch, numpy; no retrace code) of
what docs/featurization.md and docs/projection.md define: Philox-4x32-10, the
keys of every random stream, UniformInt, Box–Muller, the bucket and query
timesteps, the per-example diffusion loss, the SJLT projection. From the model
description (model.toml) and the training images it recomputes every
training-side gradient g_{n,c,b} in full dimension, and from the query images
every query gradient ḡ_c(x', s), and checks:

  (a) norms:   ‖g_{n,c,b}‖ against the store's `norms`, every sample (at least
               --min-norm-samples), relative error <= --norm-tol (1e-4);
               and the stored unit vectors u against P·g/‖g‖ with P rebuilt
               from docs/projection.md (SJLT stores), within fp16 resolution.
  (b) scores:  full-gradient TracIn and ReTrac (matched pairing) of every
               training sample for every query, against the scores retraced
               serves (asked for all N through `retrace query --json --k N`):
               Spearman and top-10 recall, averaged over the queries, must
               reach --min-spearman (0.95) and --min-recall (0.9) per method.
               The served scores are also compared with the projected scores
               recomputed here (store vectors · P applied to the query
               gradients), which must agree to float precision.
  (c) --sweep: builds a store per D (retrace-batch build-store), serves each
               (retraced) and prints Spearman / top-10 recall per D and method
               as a markdown table: a measurement for docs/evaluation.md, with
               no thresholds (small D is expected to fall short of them).

Usage (the store and a running server already there):
    check_full_gradients.py --model DIR/model.toml --store STORE \\
        --retrace build/client/retrace --server localhost:50051 \\
        --queries DIR/queries/*.png [--seed 7] [--query-timesteps 2] [--noise-draws 4]

Sweep (builds, serves and stops by itself):
    check_full_gradients.py --model DIR/model.toml --sweep 512,1024,4096 \\
        --work WORKDIR --retrace-batch build/jobs/retrace-batch \\
        --retraced build/server/retraced/retraced --retrace build/client/retrace \\
        --queries DIR/queries/*.png

Exit status: 0 when every check passes, 1 when one fails, 2 on usage errors.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
import tomllib

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pngio  # noqa: E402

# --- Philox-4x32-10 (Salmon et al., SC 2011), on numpy uint64 lanes ---------

U64 = np.uint64
MASK32 = U64(0xFFFFFFFF)
PHILOX_M0, PHILOX_M1 = U64(0xD2511F53), U64(0xCD9E8D57)
PHILOX_W0, PHILOX_W1 = U64(0x9E3779B9), U64(0xBB67AE85)
PHILOX_ROUNDS = 10

# Random123's known-answer vectors for philox4x32_10 (kat_vectors):
# (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2,
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 of counters (c0..c3) under keys (k0, k1): arrays (or
    scalars) of 32-bit values held in uint64, broadcast together. Each round:
    p0 = M0·c0, p1 = M1·c2 (full 64-bit products), then
    (c0, c1, c2, c3) <- (hi(p1) ^ c1 ^ k0, lo(p1), hi(p0) ^ c3 ^ k1, lo(p0)),
    and the key is bumped by the Weyl constants after every round."""
    c0, c1, c2, c3, k0, k1 = (np.asarray(v, dtype=U64) for v in (c0, c1, c2, c3, k0, k1))
    for _ in range(PHILOX_ROUNDS):
        p0 = PHILOX_M0 * c0  # < 2^64: never wraps
        p1 = PHILOX_M1 * c2
        c0, c1, c2, c3 = ((p1 >> U64(32)) ^ c1 ^ k0, p1 & MASK32,
                          (p0 >> U64(32)) ^ c3 ^ k1, p0 & MASK32)
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def check_philox_kat():
    for counter, key, want in PHILOX_KAT:
        got = tuple(int(w) for w in philox4x32_10(*counter, *key))
        if got != want:
            raise SystemExit(f"Philox-4x32-10 known-answer test failed: counter "
                             f"{counter}, key {key}: got {[hex(w) for w in got]}, "
                             f"want {[hex(w) for w in want]}")


# --- counter-based draws (server/model/counter_rng.h) ------------------------

STREAM_BUILD_TIMESTEP, STREAM_BUILD_NOISE, STREAM_QUERY_NOISE = 3, 4, 5


def random_words(seed, stream, id0, id1, id2, index):
    """Words `index` (uint64 array) of the stream keyed by
    (seed, stream; id0, id1, id2): word w is word w % 4 of the Philox block
    w // 4, whose counter is (lo(w // 4), id0, id1, (stream << 24) ^ id2)
    under the key (lo(seed), hi(seed) ^ hi(w // 4))."""
    assert 0 <= id2 < (1 << 24) and 0 <= id0 < (1 << 32) and 0 <= id1 < (1 << 32)
    index = np.asarray(index, dtype=U64)
    block = index >> U64(2)
    words = philox4x32_10(block & MASK32, U64(id0), U64(id1),
                          U64((stream << 24) ^ id2),
                          U64(seed & 0xFFFFFFFF),
                          U64(seed >> 32) ^ (block >> U64(32)))
    stacked = np.stack(np.broadcast_arrays(*words))  # [4, ...]
    return np.take_along_axis(stacked, (index & U64(3)).astype(np.int64)[None], 0)[0]


def uniform_int(seed, stream, id0, id1, id2, lo, hi):
    """lo + floor(w · (hi − lo) / 2^32), w = word 0 of the stream."""
    w = int(random_words(seed, stream, id0, id1, id2, np.array([0]))[0])
    return lo + ((w * (hi - lo)) >> 32)


def gaussian_fill(seed, stream, id0, id1, id2, count):
    """count standard normal float32 values: values 2k and 2k+1 come from words
    2k and 2k+1 of the stream by Box–Muller in double,
    u1 = (w_2k + 1)/2^32, u2 = w_2k+1/2^32, r = sqrt(−2 ln u1),
    z_2k = r·cos(2π u2), z_2k+1 = r·sin(2π u2), each rounded to float32."""
    pairs = (count + 1) // 2
    w = random_words(seed, stream, id0, id1, id2, np.arange(2 * pairs, dtype=U64))
    inv = 1.0 / 4294967296.0
    u1 = (w[0::2].astype(np.float64) + 1.0) * inv
    u2 = w[1::2].astype(np.float64) * inv
    r = np.sqrt(-2.0 * np.log(u1))
    angle = 6.283185307179586476925286766559 * u2
    z = np.empty(2 * pairs, dtype=np.float64)
    z[0::2] = r * np.cos(angle)
    z[1::2] = r * np.sin(angle)
    return z[:count].astype(np.float32)


def build_timestep(store_seed, n, c, b, j, lo, hi):
    return uniform_int(store_seed, STREAM_BUILD_TIMESTEP, n, (c << 16) | b, j, lo, hi)


def build_noise(store_seed, n, c, b, j, count):
    return gaussian_fill(store_seed, STREAM_BUILD_NOISE, n, (c << 16) | b, j, count)


def query_noise(request_seed, c, b, i, r, count):
    return gaussian_fill(request_seed, STREAM_QUERY_NOISE, c, (b << 16) | i, r, count)


def query_timesteps(lo, hi, k):
    """The floored centres of k equal sub-intervals of [lo, hi)."""
    return [lo + (2 * i + 1) * (hi - lo) // (2 * k) for i in range(k)]


def equal_bucket_edges(buckets, timesteps):
    return [b * timesteps // buckets for b in range(buckets + 1)]


# --- SJLT projection (docs/projection.md) ------------------------------------

SJLT_DOMAIN = 0x534A4C54


def sjlt_rows_signs(seed, p, dim, s):
    """(rows [s, p] int64, signs [s, p] float64) of the SJLT matrix: column i
    has sign_k/√s at row_k for each of the s row blocks."""
    i = np.arange(p, dtype=U64)
    words = []
    for n in range((s + 3) // 4):
        words += list(philox4x32_10(i & MASK32, i >> U64(32), U64(n),
                                    U64(SJLT_DOMAIN), U64(seed & 0xFFFFFFFF),
                                    U64(seed >> 32)))
    rows = np.empty((s, p), dtype=np.int64)
    signs = np.empty((s, p), dtype=np.float64)
    for k in range(s):
        begin = k * dim // s
        size = (k + 1) * dim // s - begin
        w = words[k]
        rows[k] = (begin + (((w >> U64(1)) * U64(size)) >> U64(31))).astype(np.int64)
        signs[k] = np.where((w & U64(1)) == U64(1), -1.0, 1.0)
    return rows, signs


def check_sjlt_worked_values():
    """The worked values of docs/projection.md: D = 1024, s = 4, seed 0,
    column 0 has (row, sign) = (105, +), (296, -), (691, -), (962, +)."""
    rows, signs = sjlt_rows_signs(0, 1, 1024, 4)
    got = [(int(r), int(s)) for r, s in zip(rows[:, 0], signs[:, 0])]
    if got != [(105, 1), (296, -1), (691, -1), (962, 1)]:
        raise SystemExit(f"SJLT column 0 (D = 1024, s = 4, seed 0) is {got}, "
                         f"docs/projection.md says (105, +), (296, -), (691, -), (962, +)")


class Sjlt:
    def __init__(self, seed, p, dim, s):
        self.dim, self.s = dim, s
        self.rows, self.signs = sjlt_rows_signs(seed, p, dim, s)

    def __call__(self, x):
        x = np.asarray(x, dtype=np.float64)
        out = np.zeros(self.dim)
        for k in range(self.s):
            out += np.bincount(self.rows[k], weights=self.signs[k] * x,
                               minlength=self.dim)
        return out / math.sqrt(self.s)


# --- the model description, schedule and data --------------------------------

def alpha_bars_of(schedule):
    kind = schedule.get("type", "cosine")
    T = int(schedule.get("timesteps", 1000))
    if kind == "linear":
        lo = float(schedule.get("beta_start", 1e-4))
        hi = float(schedule.get("beta_end", 0.02))
        betas = lo + (hi - lo) * np.arange(T, dtype=np.float64) / (T - 1)
    elif kind == "cosine":
        def f(s):
            c = np.cos((s + 0.008) / 1.008 * math.pi / 2.0)
            return c * c
        t = np.arange(T, dtype=np.float64)
        betas = np.minimum(1.0 - f((t + 1) / T) / f(t / T), 0.999)
    elif kind == "betas":
        betas = np.asarray(schedule["values"], dtype=np.float64)
    elif kind == "alpha_bars":
        return np.asarray(schedule["values"], dtype=np.float64)
    else:
        raise SystemExit(f"unknown schedule type {kind!r}")
    return np.cumprod(1.0 - betas)  # sequential products, as the C++ loop


class ModelDescription:
    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.dir = os.path.dirname(self.path)
        with open(self.path, "rb") as f:
            d = tomllib.load(f)
        if d.get("format") != "retrace-model":
            raise SystemExit(f"{path}: format is not 'retrace-model'")
        self.kind = d["model"]["kind"]
        if self.kind != "torchscript":
            raise SystemExit(f"{path}: this check loads TorchScript models only")
        img = d["image"]
        self.shape = (int(img["channels"]), int(img["height"]), int(img["width"]))
        self.pixel_range = tuple(float(v) for v in img.get("pixel_range", [-1.0, 1.0]))
        self.alpha_bars = alpha_bars_of(d["schedule"])
        self.timesteps = len(self.alpha_bars)
        loss = d.get("loss", {})
        self.power = {"mse": 2, "l1": 1}[loss.get("type", "mse")]
        self.checkpoints = []
        for ck in d["checkpoints"]:
            file = os.path.join(self.dir, ck["file"])
            if "sha256" in ck:
                with open(file, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                if digest != ck["sha256"]:
                    raise SystemExit(f"{file}: sha256 {digest}, model.toml says {ck['sha256']}")
            self.checkpoints.append((file, float(ck["weight"])))
        data = d["data"]
        if data.get("source", "folder") != "folder":
            raise SystemExit(f"{path}: this check reads image folders only")
        self.data_root = os.path.join(self.dir, data["path"])

    def pixels(self, rgb_bytes):
        """uint8 [H, W, C] -> float32 [C, H, W] as retrace feeds the model."""
        lo, hi = self.pixel_range
        b = rgb_bytes.astype(np.float32).transpose(2, 0, 1)
        if (lo, hi) == (-1.0, 1.0):
            return np.ascontiguousarray(b / np.float32(127.5) - np.float32(1.0))
        v = b.astype(np.float64)
        return np.ascontiguousarray((lo + (hi - lo) * v / 255.0).astype(np.float32))

    def load_image(self, path):
        a = pngio.read_png(path)
        c = self.shape[0]
        if a.shape[2] != c:
            if c == 3 and a.shape[2] == 4:
                a = a[:, :, :3]
            else:
                raise SystemExit(f"{path}: {a.shape[2]} channels, model wants {c}")
        return self.pixels(a)

    def training_images(self):
        """The folder in retrace's order: classes (sub-folders) in byte-wise
        name order, then files in byte-wise name order; hidden entries and
        other extensions skipped."""
        exts = (".png",)
        images = []
        for cls in sorted(os.listdir(self.data_root), key=os.fsencode):
            d = os.path.join(self.data_root, cls)
            if cls.startswith(".") or not os.path.isdir(d):
                continue
            for name in sorted(os.listdir(d), key=os.fsencode):
                if name.startswith(".") or not name.lower().endswith(exts):
                    continue
                images.append(self.load_image(os.path.join(d, name)))
        return np.stack(images)


# --- gradients ---------------------------------------------------------------

class GradientComputer:
    """Mean gradients (1/k) Σ_rows ∇ℓ over all trainable parameters of one
    checkpoint, flattened in named_parameters order, as float64 numpy."""

    def __init__(self, desc, checkpoint_file, param_regex=""):
        self.model = torch.jit.load(checkpoint_file, map_location="cpu")
        self.model.eval()
        named = list(self.model.named_parameters())
        regex = re.compile(param_regex) if param_regex else None
        self.params = [p for name, p in named
                       if regex is None or regex.fullmatch(name)]
        self.p = sum(p.numel() for p in self.params)
        self.power = desc.power
        self.signal = torch.from_numpy(np.sqrt(desc.alpha_bars)).float()
        self.noise = torch.from_numpy(np.sqrt(1.0 - desc.alpha_bars)).float()

    def mean_gradient(self, x, t, eps):
        """x, eps: float32 [rows, C, H, W]; t: int64 [rows]."""
        x, eps = torch.from_numpy(x), torch.from_numpy(eps)
        t = torch.as_tensor(t, dtype=torch.int64)
        view = (-1, 1, 1, 1)
        x_t = self.signal[t].view(view) * x + self.noise[t].view(view) * eps
        diff = (eps - self.model(x_t, t)).reshape(x.shape[0], -1)
        per_row = (diff.abs() if self.power == 1 else diff * diff).mean(1)
        grads = torch.autograd.grad(per_row.mean(), self.params)
        return np.concatenate([g.reshape(-1).double().numpy() for g in grads])


# --- the store ----------------------------------------------------------------

def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__", None)
    out = {}
    for name, t in header.items():
        begin, end = t["data_offsets"]
        dt = {"F16": "<f2", "BF16": "<u2", "F32": "<f4", "I32": "<i4", "I64": "<i8"}[t["dtype"]]
        a = np.frombuffer(data, dt, (end - begin) // np.dtype(dt).itemsize,
                          8 + length + begin).reshape(t["shape"])
        if t["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a.astype(np.float32) if t["dtype"] in ("F16", "BF16") else a
    return out


class Store:
    def __init__(self, path):
        with open(os.path.join(path, "manifest.json")) as f:
            self.manifest = json.load(f)
        m = self.manifest
        self.edges = m["buckets"]["edges"]
        self.buckets = len(self.edges) - 1
        self.replay = bool(m["buckets"]["replay"])
        self.proj = m["projection"]
        self.m = int(m["grad_timesteps"])
        self.store_seed = int(m["dataset"].get("store_seed", 0))
        shards = [load_safetensors(os.path.join(path, s["file"])) for s in m["shards"]]
        self.norms = np.concatenate([s["norms"] for s in shards])
        self.vectors = np.concatenate([s["vectors"] for s in shards])
        self.n = self.norms.shape[0]
        self.weights = [float(c["weight"]) for c in m["model"]["checkpoints"]]


# --- statistics ---------------------------------------------------------------

def ranks(a):
    """Ranks 1..n with ties given their average rank."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    r = np.empty(len(a))
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return r


def spearman(a, b):
    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra @ rb) / math.sqrt((ra @ ra) * (rb @ rb)))


def top_k_recall(reference, other, k=10):
    """|top-k(reference) ∩ top-k(other)| / k; ties broken by lower index, as
    retrace does."""
    top = lambda s: set(np.lexsort((np.arange(len(s)), -np.asarray(s)))[:k].tolist())
    return len(top(reference) & top(other)) / k


# --- the computation ------------------------------------------------------------

class FullScores:
    """Full-gradient training norms and scores for every query."""

    def __init__(self, norms, tracin, retrac, projected):
        self.norms = norms          # [N, C, B]
        self.tracin = tracin        # [Q, N]
        self.retrac = retrac        # [Q, N]
        self.projected = projected  # {(dim, seed, s): (tracin [Q, N], retrac [Q, N], rows)}


def compute_full(desc, edges, store_seed, m, queries, seed, k, r, weights,
                 param_regex="", projections=(), row_samples=(), log=print):
    """Recomputes every training-side gradient and every query gradient.

    Returns norms [N, C, B], full TracIn / ReTrac scores [Q, N], and for each
    SJLT projection (dim, seed, s) in `projections` the unit vectors P·g/‖g‖ of
    the samples in `row_samples` and the query's projected q_raw / q_unit
    (for comparing with the store and the served scores)."""
    C, H, W = desc.shape
    numel = C * H * W
    images = desc.training_images()
    N, B, Q = len(images), len(edges) - 1, len(queries)
    q_images = [desc.load_image(p) for p in queries]
    norms = np.zeros((N, len(weights), B))
    tracin = np.zeros((Q, N))
    retrac = np.zeros((Q, N))
    proj_out = {}
    projectors = {}
    start = time.time()
    for c, (file, weight) in enumerate(desc.checkpoints):
        grad = GradientComputer(desc, file, param_regex)
        for spec in projections:
            if spec not in projectors:
                projectors[spec] = Sjlt(spec[1], grad.p, spec[0], spec[2])
            proj_out.setdefault(spec, {"q_raw": np.zeros((Q, len(weights), B, spec[0])),
                                       "q_unit": np.zeros((Q, len(weights), B, spec[0])),
                                       "rows": {}})
        # Query side: mean_s ḡ(s) and mean_s ḡ(s)/‖ḡ(s)‖ per bucket.
        q_raw = np.zeros((Q, B, grad.p))
        q_unit = np.zeros((Q, B, grad.p))
        for qi, x in enumerate(q_images):
            for b in range(B):
                for i, s in enumerate(query_timesteps(edges[b], edges[b + 1], k)):
                    eps = np.stack([query_noise(seed, c, b, i, j, numel).reshape(C, H, W)
                                    for j in range(r)])
                    g = grad.mean_gradient(np.repeat(x[None], r, 0), [s] * r, eps)
                    q_raw[qi, b] += g / k
                    q_unit[qi, b] += g / np.linalg.norm(g) / k
        for spec, proj in projectors.items():
            for qi in range(Q):
                for b in range(B):
                    proj_out[spec]["q_raw"][qi, c, b] = proj(q_raw[qi, b])
                    proj_out[spec]["q_unit"][qi, c, b] = proj(q_unit[qi, b])
        log(f"  checkpoint {c}: {Q} queries x {B} buckets x {k} timesteps x {r} draws "
            f"done ({time.time() - start:.0f} s)")
        # Training side: g_{n,c,b} = (1/m) Σ_j ∇ℓ(x_n, t_j, ε_j).
        for n in range(N):
            for b in range(B):
                t = [build_timestep(store_seed, n, c, b, j, edges[b], edges[b + 1])
                     for j in range(m)]
                eps = np.stack([build_noise(store_seed, n, c, b, j, numel).reshape(C, H, W)
                                for j in range(m)])
                g = grad.mean_gradient(np.repeat(images[n][None], m, 0), t, eps)
                norm = float(np.linalg.norm(g))
                norms[n, c, b] = norm
                tracin[:, n] += weight * (q_raw[:, b] @ g)
                if norm > 0:
                    retrac[:, n] += weight * (q_unit[:, b] @ g) / norm
                if n in row_samples:
                    for spec, proj in projectors.items():
                        proj_out[spec]["rows"][(n, c, b)] = proj(g / norm) if norm > 0 else 0
            if (n + 1) % 50 == 0 or n + 1 == N:
                log(f"  checkpoint {c}: {n + 1}/{N} training samples "
                    f"({time.time() - start:.0f} s)")
    return norms, tracin, retrac, proj_out


def projected_scores(store, proj, weights):
    """Σ_c w_c Σ_b ‖g‖⟨u, q_raw⟩ and Σ_c w_c Σ_b ⟨u, q_unit⟩ from the store's
    u and ‖g‖ and the query vectors projected here: [Q, N] each."""
    B = store.buckets
    u = store.vectors[:, :, :B, :].astype(np.float64)        # [N, C, B, D]
    g_norm = store.norms[:, :, :B].astype(np.float64)        # [N, C, B]
    w = np.asarray(weights)
    dots_raw = np.einsum("ncbd,qcbd->qncb", u, proj["q_raw"])
    dots_unit = np.einsum("ncbd,qcbd->qncb", u, proj["q_unit"])
    tracin = np.einsum("qncb,ncb,c->qn", dots_raw, g_norm, w)
    retrac = np.einsum("qncb,c->qn", dots_unit, w)
    return tracin, retrac


# --- talking to retrace ---------------------------------------------------------

def served_scores(retrace, server, image, n, seed, k, r):
    """Every sample's TracIn and ReTrac score for one image, from
    `retrace query --json --k N`."""
    cmd = [retrace, "query", image, "--server", server, "--json", "--k", str(n),
           "--method", "both", "--seed", str(seed), "--query-timesteps", str(k),
           "--noise-draws", str(r), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    answer = json.loads(proc.stdout)
    out = {}
    for method in ("tracin", "retrac"):
        entries = answer["results"][method]["proponents"]
        scores = np.full(n, np.nan)
        for e in entries:
            scores[e["index"]] = e["score"]
        if len(entries) != n or np.isnan(scores).any():
            raise SystemExit(f"retrace query --k {n} returned {len(entries)} {method} "
                             f"scores covering {int((~np.isnan(scores)).sum())} of {n} samples")
        out[method] = scores
    return out


class Server:
    """retraced on a free port for the duration of a `with` block; entered
    once `retrace health` says SERVING (retraced listens, and answers
    UNAVAILABLE, while it is still loading the store)."""

    def __init__(self, retraced, retrace, store, model, workdir, extra=()):
        self.cmd = [retraced, "--store", store, "--model", model,
                    "--listen", "127.0.0.1:0", "--metrics-port", "-1",
                    "--port-file", os.path.join(workdir, "retraced.port")] + list(extra)
        self.retrace = retrace
        self.port_file = os.path.join(workdir, "retraced.port")
        self.log_path = os.path.join(workdir, "retraced.log")

    def __enter__(self):
        if os.path.exists(self.port_file):
            os.remove(self.port_file)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        self.address = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"retraced exited {self.proc.returncode} at start-up; "
                                 f"log: {self.log_path}")
            if self.address is None and os.path.exists(self.port_file):
                text = open(self.port_file).read().strip()
                if text:
                    self.address = f"127.0.0.1:{int(text)}"
            if self.address is not None:
                health = subprocess.run([self.retrace, "health", "--server", self.address],
                                        capture_output=True, text=True)
                if health.returncode == 0:
                    return self
            time.sleep(0.5)
        self.__exit__()
        raise SystemExit(f"retraced was not SERVING within 300 s; log: {self.log_path}")

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return False


# --- reports ----------------------------------------------------------------------

def fidelity(full, served):
    """Per method: (mean Spearman, min Spearman, mean top-10 recall, min recall)."""
    out = {}
    for method in ("tracin", "retrac"):
        rho = [spearman(full[method][q], served[method][q]) for q in range(len(served[method]))]
        rec = [top_k_recall(full[method][q], served[method][q]) for q in range(len(served[method]))]
        out[method] = (float(np.mean(rho)), float(np.min(rho)),
                       float(np.mean(rec)), float(np.min(rec)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", required=True, help="model.toml")
    ap.add_argument("--store", help="store directory (check mode)")
    ap.add_argument("--server", help="HOST:PORT of retraced serving --store (check mode)")
    ap.add_argument("--retrace", required=True, help="the retrace CLI binary")
    ap.add_argument("--queries", nargs="+", required=True, help="query images (PNG)")
    ap.add_argument("--seed", type=int, default=7, help="request seed of the queries")
    ap.add_argument("--query-timesteps", type=int, default=2)
    ap.add_argument("--noise-draws", type=int, default=4)
    ap.add_argument("--min-norm-samples", type=int, default=20)
    ap.add_argument("--norm-tol", type=float, default=1e-4)
    ap.add_argument("--min-spearman", type=float, default=0.95)
    ap.add_argument("--min-recall", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", help="comma-separated D values: build, serve, report")
    ap.add_argument("--work", help="sweep: directory for the stores")
    ap.add_argument("--retrace-batch", help="sweep: the retrace-batch binary")
    ap.add_argument("--retraced", help="sweep: the retraced binary")
    ap.add_argument("--buckets", type=int, default=10, help="sweep: --buckets")
    ap.add_argument("--store-seed", type=int, default=0, help="sweep: --store-seed")
    ap.add_argument("--proj-seed", type=int, default=0, help="sweep: --proj-seed")
    ap.add_argument("--row-samples", type=int, default=3,
                    help="samples whose stored unit vectors are rebuilt with P (check mode)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    check_philox_kat()
    check_sjlt_worked_values()
    print("Philox-4x32-10: Random123 known-answer vectors reproduced; "
          "SJLT: docs/projection.md's worked column reproduced")
    desc = ModelDescription(args.model)
    queries = sorted(args.queries)
    if len(queries) < 1:
        ap.error("no query images")
    k, r, seed = args.query_timesteps, args.noise_draws, args.seed
    weights = [w for _, w in desc.checkpoints]

    if args.sweep:
        if not (args.work and args.retrace_batch and args.retraced):
            ap.error("--sweep needs --work, --retrace-batch and --retraced")
        return sweep(args, desc, queries, weights)
    if not (args.store and args.server):
        ap.error("check mode needs --store and --server")
    return check(args, desc, queries, weights)


def check(args, desc, queries, weights):
    k, r, seed = args.query_timesteps, args.noise_draws, args.seed
    store = Store(args.store)
    failures = []
    N = store.n
    proj = store.proj
    sjlt = proj["type"] == "sjlt"
    spec = (int(proj["dim"]), int(proj["seed"]), int(proj["sparsity"]))
    row_samples = sorted({0, N // 2, N - 1} if args.row_samples >= 3
                         else set(range(min(args.row_samples, N))))
    print(f"store: N = {N}, C = {len(weights)}, B = {store.buckets}, D = {spec[0]} "
          f"({proj['type']}), m = {store.m}, store seed {store.store_seed}; "
          f"{len(queries)} queries, request seed {seed}, k = {k}, r = {r}")
    print("served scores: retrace query --json --k N ...")
    served = {"tracin": [], "retrac": []}
    t0 = time.time()
    for q in queries:
        s = served_scores(args.retrace, args.server, q, N, seed, k, r)
        for method in served:
            served[method].append(s[method])
    served = {m: np.stack(v) for m, v in served.items()}
    print(f"  {len(queries)} queries answered in {time.time() - t0:.1f} s, "
          f"{N} scores per method each")
    print("full-dimensional gradients (training side and queries):")
    norms, tracin, retrac, proj_out = compute_full(
        desc, store.edges, store.store_seed, store.m, queries, seed, k, r, weights,
        store.proj.get("param_regex", ""), [spec] if sjlt else [], row_samples)
    if norms.shape[0] != N:
        failures.append(f"the image folder has {norms.shape[0]} images, the store {N}")
        return report(failures)

    # (a) norms.
    stored = store.norms[:, :, :store.buckets].astype(np.float64)
    rel = np.abs(stored - norms) / np.maximum(norms, 1e-30)
    worst = np.unravel_index(np.argmax(rel), rel.shape)
    print(f"\n(a) full-dimensional norms, {N} samples x {len(weights)} checkpoints x "
          f"{store.buckets} buckets: max relative error {rel.max():.2e} at (n, c, b) = "
          f"{tuple(int(i) for i in worst)}, median {np.median(rel):.2e} (limit {args.norm_tol:g})")
    if N < args.min_norm_samples:
        failures.append(f"only {N} samples for the norm check, want {args.min_norm_samples}")
    if not rel.max() <= args.norm_tol:
        failures.append(f"norm relative error {rel.max():.3e} > {args.norm_tol:g}")
    if sjlt:
        rows = proj_out[spec]["rows"]
        # The store rounds u to its dtype once (nearest): an entry of magnitude
        # |x| moves by at most 2^-11·|x| in fp16 (11 significant bits), 2^-8·|x|
        # in bf16, plus half the smallest subnormal spacing. On top of that the
        # two gradient computations differ in float summation order (the norms
        # by about 1e-6 relative), which moves an entry by far less than
        # 1e-5 of the largest one; that is the allowance.
        dtype = store.manifest["dtype"].upper()
        rel_bound, floor = {"F16": (2.0 ** -11, 2.0 ** -25), "FP16": (2.0 ** -11, 2.0 ** -25),
                            "BF16": (2.0 ** -8, 1e-38), "BFLOAT16": (2.0 ** -8, 1e-38)
                            }.get(dtype, (2.0 ** -20, 1e-38))
        worst_ratio, worst_abs = 0.0, 0.0
        for (n, c, b), u in rows.items():
            delta = np.abs(store.vectors[n, c, b] - u)
            bound = rel_bound * np.abs(u) + floor + 1e-5 * np.abs(u).max()
            worst_ratio = max(worst_ratio, float((delta / bound).max()))
            worst_abs = max(worst_abs, float(delta.max()))
        print(f"    stored unit vectors u of samples {row_samples} (every c, b) against "
              f"P·g/‖g‖ rebuilt from docs/projection.md: max |Δ| {worst_abs:.2e}, "
              f"max |Δ| / ({dtype} rounding bound) {worst_ratio:.3f} (limit 1)")
        if not worst_ratio <= 1.0:
            failures.append(f"stored unit vectors differ from P·g/‖g‖ by {worst_ratio:.3f} "
                            f"times the {dtype} rounding bound")

    # (b) scores.
    full = {"tracin": tracin, "retrac": retrac}
    fid = fidelity(full, served)
    print(f"\n(b) served scores (D = {spec[0]}) against full-gradient scores, "
          f"{len(queries)} queries x {N} training samples:")
    print(f"    {'method':<8} {'Spearman mean':>13} {'min':>7} {'top-10 recall mean':>19} {'min':>5}")
    for method, (rho, rho_min, rec, rec_min) in fid.items():
        print(f"    {method:<8} {rho:13.4f} {rho_min:7.4f} {rec:19.3f} {rec_min:5.2f}")
        if not rho >= args.min_spearman:
            failures.append(f"{method}: mean Spearman {rho:.4f} < {args.min_spearman}")
        if not rec >= args.min_recall:
            failures.append(f"{method}: mean top-10 recall {rec:.3f} < {args.min_recall}")
    print(f"    per query (Spearman TracIn / ReTrac, recall TracIn / ReTrac):")
    for qi, q in enumerate(queries):
        print(f"      {os.path.basename(q):<16} "
              f"{spearman(tracin[qi], served['tracin'][qi]):.4f} / "
              f"{spearman(retrac[qi], served['retrac'][qi]):.4f}   "
              f"{top_k_recall(tracin[qi], served['tracin'][qi]):.1f} / "
              f"{top_k_recall(retrac[qi], served['retrac'][qi]):.1f}")
    if sjlt:
        p_tracin, p_retrac = projected_scores(store, proj_out[spec], weights)
        for method, mine in (("tracin", p_tracin), ("retrac", p_retrac)):
            scale = np.abs(mine).max(axis=1, keepdims=True)
            err = (np.abs(served[method] - mine) / scale).max()
            print(f"    {method}: served vs projected here (store u, ‖g‖ · P of the "
                  f"query gradients): max |Δ| / max |score| = {err:.2e} (limit 1e-4)")
            if not err <= 1e-4:
                failures.append(f"{method}: served scores differ from the projected "
                                f"scores recomputed here by {err:.3e} of the largest")
    return report(failures)


def sweep(args, desc, queries, weights):
    os.makedirs(args.work, exist_ok=True)
    dims = [int(d) for d in args.sweep.split(",")]
    k, r, seed = args.query_timesteps, args.noise_draws, args.seed
    edges = equal_bucket_edges(args.buckets, desc.timesteps)
    print(f"full-dimensional gradients ({len(queries)} queries, B = {args.buckets}, "
          f"store seed {args.store_seed}):")
    # The full-gradient scores depend only on these inputs; keep them, so a
    # rerun (another D) does not recompute them.
    key = hashlib.sha256()
    for path in [args.model] + [f for f, _ in desc.checkpoints] + queries:
        with open(path, "rb") as f:
            key.update(hashlib.sha256(f.read()).digest())
    for dirpath, dirs, files in sorted(os.walk(desc.data_root)):
        dirs.sort()
        for name in sorted(files):
            with open(os.path.join(dirpath, name), "rb") as f:
                key.update(name.encode() + hashlib.sha256(f.read()).digest())
    key.update(json.dumps([edges, args.store_seed, seed, k, r]).encode())
    cache = os.path.join(args.work, f"full-scores-{key.hexdigest()[:16]}.npz")
    if os.path.exists(cache):
        saved = np.load(cache)
        norms, tracin, retrac = saved["norms"], saved["tracin"], saved["retrac"]
        print(f"  reusing {cache}")
    else:
        t0 = time.time()
        norms, tracin, retrac, _ = compute_full(desc, edges, args.store_seed, 1, queries,
                                                seed, k, r, weights)
        np.savez(cache + ".tmp.npz", norms=norms, tracin=tracin, retrac=retrac)
        os.replace(cache + ".tmp.npz", cache)
        print(f"  done in {time.time() - t0:.0f} s")
    N = norms.shape[0]
    full = {"tracin": tracin, "retrac": retrac}
    rows = []
    for dim in dims:
        store = os.path.join(args.work, f"store-d{dim}")
        if not os.path.exists(os.path.join(store, "manifest.json")):
            cmd = [args.retrace_batch, "build-store", "--model", args.model, "--out", store,
                   "--dim", str(dim), "--buckets", str(args.buckets),
                   "--store-seed", str(args.store_seed), "--proj-seed", str(args.proj_seed),
                   "--threads", str(args.threads), "--quiet"]
            t1 = time.time()
            subprocess.run(cmd, check=True)
            print(f"built {store} in {time.time() - t1:.0f} s")
        s = Store(store)
        rel = np.abs(s.norms[:, :, :s.buckets] - norms) / np.maximum(norms, 1e-30)
        served = {"tracin": [], "retrac": []}
        with Server(args.retraced, args.retrace, store, args.model, args.work) as server:
            for q in queries:
                sc = served_scores(args.retrace, server.address, q, N, seed, k, r)
                for method in served:
                    served[method].append(sc[method])
        served = {m: np.stack(v) for m, v in served.items()}
        fid = fidelity(full, served)
        rows.append((dim, fid, float(rel.max())))
    print(f"\nprojection fidelity: {len(queries)} queries x {N} training samples, "
          f"C = {len(weights)}, B = {args.buckets}, sjlt, request seed {seed}, "
          f"k = {k}, r = {r}")
    print(f"| D | method | Spearman (mean) | Spearman (min) | top-10 recall (mean) | "
          f"top-10 recall (min) | max norm rel. error |")
    print("|---|---|---|---|---|---|---|")
    for dim, fid, norm_err in rows:
        for method, (rho, rho_min, rec, rec_min) in fid.items():
            name = {"tracin": "TracIn", "retrac": "ReTrac"}[method]
            print(f"| {dim} | {name} | {rho:.4f} | {rho_min:.4f} | {rec:.3f} | "
                  f"{rec_min:.2f} | {norm_err:.1e} |")
    return 0


def report(failures):
    if failures:
        print("\nFAILED:")
        for f in failures:
            print("  " + f)
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
