#!/usr/bin/env python3
"""Draws the figures of `retrace-batch eval` from its report.json.

    /usr/bin/python3 jobs/eval/plots.py REPORT_JSON OUT_DIR

Writes into OUT_DIR (created if missing), printing each file's path: norms.png
(median gradient norm per timestep bucket and checkpoint, a panel per seed, at
most four), roc.png (outlier detectors, first seed), influence_hist.png (how
many queries each sample is a top-k proponent for, matched pairing, first
seed), and fidelity.png and lds.png when the report has those sections.
Needs Debian's python3-matplotlib; draws off-screen (Agg). Exits with status 2
and a message naming the key when the report lacks one.
"""
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

SIZE = (9, 6)  # inches; at DPI this is 900x600 pixels
DPI = 100
MAX_NORM_PANELS = 4
NAMES = {"tracin": "TracIn", "retrac": "ReTrac", "random": "random"}
COLORS = {"tracin": "C0", "retrac": "C1", "random": "gray"}


class ReportError(Exception):
    """The report lacks something the figures need."""


def need(obj, key, where):
    """obj[key], or a ReportError that names the missing key's path."""
    if not isinstance(obj, dict) or key not in obj:
        raise ReportError(f"missing key '{where + '.' if where else ''}{key}'")
    return obj[key]


def num(x):
    """The report's numbers; JSON null (a NaN when written) becomes NaN."""
    return math.nan if x is None else float(x)


def save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    print(path)


def plot_norms(seeds, out_dir):
    shown = seeds[:1] if len(seeds) > MAX_NORM_PANELS else seeds
    fig, axes = plt.subplots(1, len(shown), figsize=SIZE, squeeze=False, sharey=True)
    for i, (ax, seed) in enumerate(zip(axes[0], shown)):
        norms, where = need(seed, "norms", f"seeds[{i}]"), f"seeds[{i}].norms"
        edges = [num(e) for e in need(norms, "bucket_edges", where)]
        mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        for step, row in zip(need(norms, "checkpoint_steps", where), need(norms, "median", where)):
            ax.plot(mids, [num(v) for v in row], marker="o", label=f"step {step}")
        ax.set_yscale("log")
        ax.set_xlabel("timestep t (bucket midpoint)")
        ax.set_title(f"seed {seed['seed']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="checkpoint")
    axes[0][0].set_ylabel("median per-sample gradient norm ‖g‖")
    fig.suptitle("Gradient norm by timestep bucket" +
                 (" (first seed only)" if len(shown) < len(seeds) else ""))
    save(fig, out_dir, "norms.png")


def plot_roc(seed, out_dir):
    outliers = need(seed, "outliers", "seeds[0]")
    fig, ax = plt.subplots(figsize=SIZE)
    for j, det in enumerate(need(outliers, "detectors", "seeds[0].outliers")):
        where = f"seeds[0].outliers.detectors[{j}]"
        roc = need(det, "roc", where)
        ax.plot([num(p[0]) for p in roc], [num(p[1]) for p in roc],
                label=f"{need(det, 'name', where)} (AUROC {num(det.get('auroc')):.3f})")
    ax.plot([0, 1], [0, 1], "k--", label="random (AUROC 0.5)")
    ax.set(xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(f"Planted-outlier detection, seed {seed['seed']} "
                 f"({outliers.get('positives', '?')} planted of "
                 f"{outliers.get('samples', '?')} samples)")
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    save(fig, out_dir, "roc.png")


def plot_influence_hist(seed, out_dir):
    rows = [g for g in need(seed, "general", "seeds[0]")
            if g.get("pairing") == "matched" and g.get("method") in ("tracin", "retrac")]
    if not rows:
        raise ReportError("seeds[0].general has no matched TracIn or ReTrac entry")
    fig, ax = plt.subplots(figsize=SIZE)
    width = 0.8 / len(rows)
    for j, g in enumerate(rows):
        hist = need(g, "histogram", "seeds[0].general[]")
        h = [x for x in range(1, len(hist)) if hist[x]]
        ax.bar([x - 0.4 + width * (j + 0.5) for x in h], [hist[x] for x in h], width=width,
               color=COLORS[g["method"]],
               label=f"{NAMES[g['method']]} ({g.get('unique', '?')} distinct samples)")
    ax.set_yscale("log")
    ax.set_xlabel(f"number of queries whose top-{rows[0].get('k', 'k')} list holds the sample")
    ax.set_ylabel("training samples")
    ax.set_title(f"How widely each proponent recurs, seed {seed['seed']}, matched pairing, "
                 f"{rows[0].get('queries', '?')} queries")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend()
    save(fig, out_dir, "influence_hist.png")


def plot_fidelity(fidelity, out_dir):
    rows = need(fidelity, "rows", "fidelity")
    fig, axes = plt.subplots(1, 2, figsize=SIZE, sharex=True)
    for ax, key, label in ((axes[0], "spearman", "Spearman ρ"),
                           (axes[1], "recall", "top-10 recall")):
        for method in ("tracin", "retrac"):
            mine = sorted((r for r in rows if r.get("method") == method),
                          key=lambda r: num(need(r, "dim", "fidelity.rows[]")))
            if not mine:
                continue
            dims = [num(r["dim"]) for r in mine]
            ax.plot(dims, [num(need(r, key + "_mean", "fidelity.rows[]")) for r in mine],
                    marker="o", color=COLORS[method], label=f"{NAMES[method]} mean")
            ax.plot(dims, [num(r.get(key + "_min")) for r in mine], linestyle="--",
                    color=COLORS[method], label=f"{NAMES[method]} min")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="projection dimension D", ylabel=f"{label} vs exact gradients")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    seed = fidelity.get("seed")
    fig.suptitle("Projection fidelity over queries" +
                 (f", seed {seed}" if seed is not None else ""))
    save(fig, out_dir, "fidelity.png")


def plot_lds(lds, out_dir):
    rows = need(lds, "rows", "lds")
    fig, ax = plt.subplots(figsize=SIZE)
    for x, r in enumerate(rows):
        mean = num(need(r, "mean", f"lds.rows[{x}]"))
        lo, hi = (num(v) for v in r.get("ci95", [None, None]))
        err = [[mean - lo], [hi - mean]] if not (math.isnan(lo) or math.isnan(hi)) else None
        marker = "s" if r.get("pairing") == "replay" else "o"
        ax.errorbar([x], [mean], yerr=err, fmt=marker, capsize=6,
                    color=COLORS.get(r.get("method"), "k"))
        if r.get("method") == "random":
            ax.axhline(mean, color="gray", linestyle="--", label="random baseline")
    labels = [NAMES.get(r.get("method"), r.get("method")) +
              ("" if r.get("pairing") in (None, "-") else f"\n{r['pairing']}") for r in rows]
    ax.set(xticks=range(len(rows)), xticklabels=labels, xlim=(-0.5, len(rows) - 0.5))
    ax.set_ylabel("LDS (Spearman ρ), mean with 95% CI")
    seed = lds.get("seed")
    ax.set_title(f"Linear datamodeling score over {lds.get('models', '?')} retrained models" +
                 (f", seed {seed}" if seed is not None else ""))
    ax.grid(True, axis="y", alpha=0.3)
    if any(r.get("method") == "random" for r in rows):
        ax.legend()
    save(fig, out_dir, "lds.png")


def main(argv):
    if len(argv) != 3:
        print("usage: plots.py REPORT_JSON OUT_DIR", file=sys.stderr)
        return 2
    report_path, out_dir = argv[1], argv[2]
    try:
        with open(report_path) as f:
            report = json.load(f)
        if need(report, "format", "") != "retrace-eval-report":
            raise ReportError(f"format is {report['format']!r}, not 'retrace-eval-report'")
        need(report, "version", "")
        seeds = need(report, "seeds", "")
        if not isinstance(seeds, list) or not seeds:
            raise ReportError("'seeds' must be a non-empty list")
        for i, seed in enumerate(seeds):
            need(seed, "seed", f"seeds[{i}]")
        os.makedirs(out_dir, exist_ok=True)
        plot_norms(seeds, out_dir)
        plot_roc(seeds[0], out_dir)
        plot_influence_hist(seeds[0], out_dir)
        if report.get("fidelity") is not None:
            plot_fidelity(report["fidelity"], out_dir)
        if report.get("lds") is not None:
            plot_lds(report["lds"], out_dir)
    except (OSError, ValueError, ReportError) as e:  # ValueError: not JSON
        print(f"plots.py: {report_path}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
