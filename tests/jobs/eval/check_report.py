"""Checks an eval folder's report.json for schema and internal consistency.

    check_report.py OUT_DIR [--reused]

Asserts what must hold whatever the scientific outcome: value ranges, that
the ROC curve's area is the AUROC, that |G_tau| and the unique count follow
from the histogram, that summaries are the means of the per-seed values, that
each LDS interval contains its mean, that the plots are PNG files. With
--reused, also that the call trained and built nothing. Standard library only.
"""
import json
import math
import os
import sys


def fail(message):
    sys.exit(f"check_report: {message}")


def check(condition, message):
    if not condition:
        fail(message)


def close(a, b, tol=1e-9):
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def finite(x):
    return x is not None and math.isfinite(x)


def in_range(x, lo, hi, what):
    check(x is None or lo - 1e-12 <= x <= hi + 1e-12, f"{what} = {x} not in [{lo}, {hi}]")


def mean(values):
    values = [v for v in values if finite(v)]
    return sum(values) / len(values) if values else None


def check_norms(seed, norms, config):
    edges = norms["bucket_edges"]
    check(len(edges) == config["buckets"] + 1, f"seed {seed}: {len(edges)} bucket edges")
    check(edges == sorted(edges) and edges[0] == 0, f"seed {seed}: bad bucket edges {edges}")
    for c, medians in enumerate(norms["median"]):
        check(len(medians) == config["buckets"], f"seed {seed}: medians of checkpoint {c}")
        check(all(finite(m) and m > 0 for m in medians), f"seed {seed}: non-positive median")
        for m, p in zip(medians, norms["p95"][c]):
            check(p >= m, f"seed {seed}: p95 {p} below median {m}")
        ratio = norms["max_min_ratio"][c]
        check(close(ratio, max(medians) / min(medians), 1e-6), f"seed {seed}: max/min ratio {ratio}")
    for rho in norms["spearman_t_norm"]:
        in_range(rho, -1, 1, f"seed {seed}: Spearman")


def roc_area(points):
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        check(x1 >= x0 and y1 >= y0, "ROC curve not monotone")
        area += (x1 - x0) * (y0 + y1) / 2
    return area


def check_outliers(seed, outliers):
    n, positives = outliers["samples"], outliers["positives"]
    if positives == 0:
        check(outliers["detectors"] == [] and outliers.get("note"), f"seed {seed}: no planted samples but detectors")
        return
    check(0 < positives < n, f"seed {seed}: {positives} planted of {n}")
    names = [d["name"] for d in outliers["detectors"]]
    check(len(names) == 4 and "random ranking" in names, f"seed {seed}: detectors {names}")
    for d in outliers["detectors"]:
        what = f"seed {seed}, {d['name']}"
        in_range(d["auroc"], 0, 1, what + " AUROC")
        in_range(d["average_precision"], 0, 1, what + " AP")
        for k, p in d["precision_at"].items():
            in_range(p, 0, 1, f"{what} p@{k}")
            check(close(p * min(int(k), n), round(p * min(int(k), n)), 1e-6), f"{what} p@{k} = {p}")
        roc = d["roc"]
        check(roc[0] == [0, 0] and roc[-1] == [1, 1], f"{what}: ROC ends {roc[0]}, {roc[-1]}")
        check(close(roc_area(roc), d["auroc"], 1e-6), f"{what}: ROC area {roc_area(roc)} != AUROC {d['auroc']}")


def check_tracing(seed, rows, config, columns):
    k, wide = f"top{config['top_k']}_own_share", f"top{config['top_k_wide']}_own_share"
    groups = {}
    for r in rows:
        in_range(r[k], 0, 1, f"seed {seed}: {k}")
        in_range(r[wide], 0, 1, f"seed {seed}: {wide}")
        in_range(r["base_rate"], 0, 1, f"seed {seed}: base rate")
        check(0 < r["queries"] <= config["queries_per_source"], f"seed {seed}: {r['queries']} queries of {r['source']}")
        groups.setdefault((r["pairing"], r["method"]), []).append(r["base_rate"])
    check(len(groups) == columns, f"seed {seed}: tracing groups {sorted(groups)}")
    for key, rates in groups.items():
        check(close(sum(rates), 1.0, 1e-9), f"seed {seed}: base rates of {key} sum to {sum(rates)}")


def check_general(seed, rows, columns):
    check(len(rows) == columns, f"seed {seed}: {len(rows)} general rows")
    for r in rows:
        what = f"seed {seed}, {r['pairing']} {r['method']}"
        q, k, hist = r["queries"], r["k"], r["histogram"]
        check(len(hist) == q + 1 and hist[0] == 0, f"{what}: histogram length {len(hist)}")
        check(sum(hist) == r["unique"], f"{what}: histogram sums to {sum(hist)}, unique {r['unique']}")
        check(sum(h * c for h, c in enumerate(hist)) == q * k, f"{what}: histogram mass != queries * k")
        for tau, g in zip(r["taus"], r["generally_influential"]):
            expected = sum(c for h, c in enumerate(hist) if h >= tau * q)
            check(g == expected, f"{what}: |G_{tau}| = {g}, histogram says {expected}")
        g = r["generally_influential"]
        check(g == sorted(g, reverse=True), f"{what}: |G_tau| not decreasing in tau")
        in_range(r["mean_jaccard"], 0, 1, what + " Jaccard")


def check_summary(report):
    seeds = report["seeds"]
    for i, row in enumerate(report["general_summary"]):
        for key in ("g_0.2", "g_0.5", "unique", "mean_jaccard"):
            values = row[key]["values"]
            check(len(values) == len(seeds), f"summary {key}: {len(values)} values")
            m = mean(values)
            check(m is None or close(m, row[key]["mean"], 1e-9), f"summary {key}: mean {row[key]['mean']} != {m}")
        per_seed = [s["general"][i]["unique"] for s in seeds]
        check(row["unique"]["values"] == per_seed, "summary unique values differ from the seeds'")


def check_fidelity(f, config):
    rows = f["rows"]
    check(len(rows) == 2 * len(config["fidelity_dims"]), f"fidelity: {len(rows)} rows")
    check(sorted({r["dim"] for r in rows}) == sorted(config["fidelity_dims"]), "fidelity dims")
    check(f["max_norm_rel_error"] < 1e-3, f"fidelity: full-dimensional norms off by {f['max_norm_rel_error']}")
    for r in rows:
        what = f"fidelity D={r['dim']} {r['method']}"
        in_range(r["spearman_mean"], -1, 1, what)
        in_range(r["recall_mean"], 0, 1, what)
        check(r["spearman_min"] <= r["spearman_mean"] + 1e-12, what + ": min above mean")
        check(r["recall_min"] <= r["recall_mean"] + 1e-12, what + ": min above mean")


def check_lds(lds, queries):
    check(len(lds["rows"]) == 5, f"lds: {len(lds['rows'])} rows")
    check(any(r["method"] == "random" for r in lds["rows"]), "lds: no random baseline")
    for r in lds["rows"]:
        what = f"lds {r['pairing']} {r['method']}"
        check(len(r["per_query"]) == queries, f"{what}: {len(r['per_query'])} per-query values")
        for v in r["per_query"]:
            in_range(v, -1, 1, what)
        m = mean(r["per_query"])
        check(m is None or close(m, r["mean"], 1e-9), f"{what}: mean {r['mean']} != {m}")
        lo, hi = r["ci95"]
        if m is not None:
            check(lo <= r["mean"] <= hi, f"{what}: interval [{lo}, {hi}] misses the mean {r['mean']}")


def main():
    if len(sys.argv) < 2:
        fail("usage: check_report.py OUT_DIR [--reused]")
    out, reused = sys.argv[1], "--reused" in sys.argv[2:]
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    check(report.get("format") == "retrace-eval-report" and report.get("version") == 1, "format/version")
    config = report["config"]
    seeds = report["seeds"]
    check([s["seed"] for s in seeds] == config["seeds"], "seeds differ from the config's")
    # Matched only, or matched and replay: the same for every seed.
    columns = len(seeds[0]["general"])
    check(columns in (2, 4), f"{columns} pairing/method columns")
    for s in seeds:
        seed = s["seed"]
        check_norms(seed, s["norms"], config)
        check_outliers(seed, s["outliers"])
        check_tracing(seed, s["tracing"], config, columns)
        check_general(seed, s["general"], columns)
        t = s["timings"]
        per_source = sum(r["queries"] for r in s["tracing"]) // columns
        check(t["queries"] == per_source, f"seed {seed}: {t['queries']} queries, tracing counts {per_source}")
        check(t["queries_per_second"] > 0, f"seed {seed}: queries per second {t['queries_per_second']}")
    check_summary(report)
    if reused:
        check(report["reused_seeds"] == config["seeds"], f"reused only {report['reused_seeds']}")
    if config["fidelity"]:
        check_fidelity(report["fidelity"], config)
    if config["lds"]:
        check_lds(report["lds"], seeds[0]["timings"]["queries"])
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    for heading in ("(a)", "(b)", "(c)", "(d)"):
        check(f"## {heading}" in md, f"report.md lacks section {heading}")
    plots = report.get("plots", {})
    check("error" not in plots, f"plots: {plots.get('error')}")
    for name in plots.get("files", []):
        path = os.path.join(out, os.path.basename(name))
        with open(path, "rb") as f:
            check(f.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG")
    check(len(plots.get("files", [])) >= 3, f"plots: {plots.get('files')}")
    print(f"check_report: {out}: ok ({len(seeds)} seeds)")


if __name__ == "__main__":
    main()
