#!/usr/bin/env python3
"""The PyTorch way of the GPU scan benchmark (bench/scan_gpu_bench.cc runs it).

Builds the benchmark's synthetic store and queries (bench/synthetic_store.h
defines them; this file rebuilds the same values with int64 arithmetic),
then for each Q scores every row the way a PyTorch user would: per block of
rows, the fp16 store block times the [C*S, D, 2Q] queries with torch.bmm, the
norms and weights applied, summed over the slots; then torch.topk of the
[Q, N] scores, largest and smallest, for TracIn and ReTrac. Two variants:
  fp32: the block converted to fp32, fp32 matmul (TF32 off): the scan's
        own arithmetic;
  fp16: fp16 block times fp16-rounded queries, fp32 accumulation in cuBLAS
        (reduced-precision reductions off), fp16 products rounded on output.
Times come from CUDA events (wall clock on the CPU), best of --reps after
one warm-up: scoring once per Q, torch.topk once per (Q, k); the time of
(Q, k) is their sum.

Prints one line per fact, parsed by scan_gpu_bench:
  TORCH_INFO torch=<version> device=<name>
  TORCH_CHECKSUM vectors=<sum of fp16 bit patterns> norms=<sum of fp32 bits>
  TORCH_TIME q=<Q> k=<k> variant=<v> scores_ms=<> topk_ms=<> total_ms=<>
  TORCH_TOP q=<Q> k=<k> variant=<v> query=<i> method=<m> list=<top|bottom>
            indices=<i,...> scores=<s,...>   (first --top-out entries)
  TORCH_ERROR <reason>    (exit 3) when the device cannot be used
"""
import argparse
import sys
import time

SEED_VECTORS, SEED_NORMS, SEED_RAW, SEED_UNIT = 1, 2, 3, 4
SEED_TRACIN_WEIGHTS, SEED_RETRAC_WEIGHTS = 5, 6
VECTOR_SCALE = 1.0 / 32.0
GENERATE_BLOCK = 1 << 26  # elements per generation step


def uniform(torch, start, count, seed, device):
    """SyntheticUniform(i, seed) for i in [start, start + count)."""
    i = torch.arange(start, start + count, dtype=torch.int64, device=device)
    h = (i & 0x7FFFFFFF) * 1103515245
    h += (i >> 31) * 12345 + seed * 2654435
    del i
    h &= 0x7FFFFFFF
    h ^= h >> 15
    h *= 0x2C1B3C6D
    h &= 0x7FFFFFFF
    h ^= h >> 12
    h *= 0x297A2D39
    h &= 0x7FFFFFFF
    h ^= h >> 15
    return ((h >> 15).to(torch.float32) - 32768.0) / 32768.0


def fill(torch, out_flat, seed, device, transform):
    for start in range(0, out_flat.numel(), GENERATE_BLOCK):
        count = min(GENERATE_BLOCK, out_flat.numel() - start)
        out_flat[start:start + count] = transform(
            uniform(torch, start, count, seed, device))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--checkpoints", type=int, required=True)
    ap.add_argument("--slots", type=int, required=True)
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("--queries", default="1,8,32,128")
    ap.add_argument("--k", default="10,100,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--block-rows", type=int, default=32768)
    ap.add_argument("--variants", default="fp32,fp16")
    ap.add_argument("--top-out", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()

    try:
        import torch
    except ImportError as e:
        print("TORCH_ERROR cannot import torch: %s" % e, flush=True)
        return 3
    if a.device == "cuda" and not torch.cuda.is_available():
        print("TORCH_ERROR torch %s sees no CUDA device" % torch.__version__,
              flush=True)
        return 3
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name(dev) if a.device == "cuda" else "cpu"
    print("TORCH_INFO torch=%s device=%s" % (torch.__version__,
                                             name.replace(" ", "_")),
          flush=True)
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    n, cs, d = a.n, a.checkpoints * a.slots, a.dim
    qs = [int(x) for x in a.queries.split(",") if x]
    ks = [int(x) for x in a.k.split(",") if x]
    qmax = max(qs)

    with torch.no_grad():
        store = torch.empty((n, cs, d), dtype=torch.float16, device=dev)
        fill(torch, store.view(-1), SEED_VECTORS, dev,
             lambda u: (u * VECTOR_SCALE).to(torch.float16))
        norms = torch.empty((n, cs), dtype=torch.float32, device=dev)
        fill(torch, norms.view(-1), SEED_NORMS, dev, lambda u: u + 1.25)
        raw = uniform(torch, 0, qmax * cs * d, SEED_RAW, dev).view(qmax, cs, d)
        unit = uniform(torch, 0, qmax * cs * d, SEED_UNIT, dev).view(qmax, cs, d)
        w_tr = (1.0 + uniform(torch, 0, qmax * cs, SEED_TRACIN_WEIGHTS, dev) *
                0.5).view(qmax, cs)
        w_rt = (1.0 + uniform(torch, 0, qmax * cs, SEED_RETRAC_WEIGHTS, dev) *
                0.5).view(qmax, cs)

        sum_v = 0
        flat = store.view(-1).view(torch.int16)
        for start in range(0, flat.numel(), GENERATE_BLOCK):
            part = flat[start:start + GENERATE_BLOCK].to(torch.int64) & 0xFFFF
            sum_v += int(part.sum().item())
        sum_n = int(norms.view(-1).view(torch.int32).to(torch.int64).sum().item())
        print("TORCH_CHECKSUM vectors=%d norms=%d" % (sum_v, sum_n), flush=True)

        def timed(fn):
            if a.device == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                stop = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                out = fn()
                stop.record()
                stop.synchronize()
                return out, start.elapsed_time(stop)
            t0 = time.perf_counter()
            out = fn()
            return out, (time.perf_counter() - t0) * 1e3

        for q in qs:
            for variant in [v for v in a.variants.split(",") if v]:
                dt = torch.float32 if variant == "fp32" else torch.float16
                # [C*S, D, 2Q]: raw queries then unit queries.
                qcat = torch.cat([raw[:q], unit[:q]], 0).permute(1, 2, 0)
                qcat = qcat.contiguous().to(dt)
                wt = w_tr[:q].t().unsqueeze(1)  # [CS, 1, Q]
                wr = w_rt[:q].t().unsqueeze(1)

                def scores():
                    tr = torch.empty((n, q), dtype=torch.float32, device=dev)
                    rt = torch.empty((n, q), dtype=torch.float32, device=dev)
                    for s in range(0, n, a.block_rows):
                        e = min(n, s + a.block_rows)
                        u = store[s:e].to(dt).transpose(0, 1)  # [CS, nb, D]
                        dots = torch.bmm(u, qcat).float()  # [CS, nb, 2Q]
                        nrm = norms[s:e].t().unsqueeze(2)  # [CS, nb, 1]
                        tr[s:e] = (dots[:, :, :q] * nrm * wt).sum(0)
                        rt[s:e] = (dots[:, :, q:] * wr).sum(0)
                    return tr.t().contiguous(), rt.t().contiguous()  # [Q, N]

                best_scores = float("inf")
                for rep in range(a.reps + 1):
                    (tr, rt), ms = timed(scores)
                    if rep > 0:
                        best_scores = min(best_scores, ms)
                for k in ks:
                    kk = min(k, n)

                    def select():
                        return [torch.topk(x, kk, dim=1, largest=largest,
                                           sorted=True)
                                for x in (tr, rt) for largest in (True, False)]

                    best_topk = float("inf")
                    for rep in range(a.reps + 1):
                        lists, ms = timed(select)
                        if rep > 0:
                            best_topk = min(best_topk, ms)
                    print("TORCH_TIME q=%d k=%d variant=%s scores_ms=%.3f "
                          "topk_ms=%.3f total_ms=%.3f" %
                          (q, k, variant, best_scores, best_topk,
                           best_scores + best_topk), flush=True)
                    labels = [("tracin", "top"), ("tracin", "bottom"),
                              ("retrac", "top"), ("retrac", "bottom")]
                    for (method, which), (vals, idx) in zip(labels, lists):
                        for query in sorted({0, q - 1}):
                            m = min(kk, a.top_out)
                            iv = idx[query, :m].tolist()
                            sv = vals[query, :m].tolist()
                            print("TORCH_TOP q=%d k=%d variant=%s query=%d "
                                  "method=%s list=%s indices=%s scores=%s" %
                                  (q, k, variant, query, method, which,
                                   ",".join(str(i) for i in iv),
                                   ",".join("%.7g" % s for s in sv)),
                                  flush=True)
                del tr, rt
                if a.device == "cuda":
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
