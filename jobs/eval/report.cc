// report.md: the figures of report.json as tables a person reads, with the
// plots embedded. Every number comes from the JSON; nothing is judged here.
#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "jobs/eval/eval.h"
#include "jobs/eval/metrics.h"
#include "jobs/progress.h"

namespace retrace::eval {
namespace {

using json = nlohmann::json;

std::string Num(const json& v, int digits = 3) {
  if (v.is_null()) return "–";
  if (v.is_number_integer()) return absl::StrCat(v.get<int64_t>());
  return absl::StrFormat("%.*f", digits, v.get<double>());
}

// "mean ± sd (v1, v2, ...)" of a list of values over seeds.
std::string Spread(const std::vector<double>& values, int digits = 3) {
  std::vector<std::string> each;
  for (double v : values) {
    each.push_back(std::isfinite(v) ? absl::StrFormat("%.*f", digits, v) : "–");
  }
  const double sd = SampleSd(values);
  std::string out = absl::StrFormat("%.*f", digits, Mean(values));
  if (std::isfinite(sd)) absl::StrAppendFormat(&out, " ± %.*f", digits, sd);
  if (values.size() > 1)
    absl::StrAppend(&out, " (", absl::StrJoin(each, ", "), ")");
  return out;
}

double D(const json& v) { return v.is_null() ? NAN : v.get<double>(); }

std::string Method(const json& row) {
  const std::string m = row.at("method").get<std::string>();
  return m == "tracin" ? "TracIn" : m == "retrac" ? "ReTrac" : m;
}

void TrainingRecipe(const json& c, std::string* md) {
  absl::StrAppendFormat(
      md,
      "- Built-in UNet (base %d channels), %d steps of batch %d, lr %g, a "
      "checkpoint every %d steps; store D = %d, %d buckets + replay slot.\n",
      c.at("base_channels").get<int>(), c.at("steps").get<int>(),
      c.at("batch_size").get<int>(), c.at("learning_rate").get<double>(),
      c.at("checkpoint_every").get<int>(), c.at("dim").get<int>(),
      c.at("buckets").get<int>());
}

void Config(const json& report, std::string* md) {
  const json& c = report.at("config");
  absl::StrAppend(md, "## Setup\n\n");
  absl::StrAppend(md, "- Created ", report.value("created", ""), " on ",
                  report.value("machine", ""), ".\n");
  if (!report.value("command", "").empty()) {
    absl::StrAppend(md, "- Command: `", report.value("command", ""), "`\n");
  }
  if (!c.value("model", "").empty()) {
    absl::StrAppend(
        md, "- Model: the description `", c.at("model").get<std::string>(),
        "` (not trained by the eval; the training data it names); seeds ",
        c.at("seeds").dump(), " (each seed builds a store with that ",
        "store and projection seed and attributes the queries).\n");
    absl::StrAppendFormat(md, "- Store D = %d, %d buckets.\n",
                          c.at("dim").get<int>(), c.at("buckets").get<int>());
  } else {
    absl::StrAppend(md, "- Training set: `", c.at("data").get<std::string>(),
                    "`; seeds ", c.at("seeds").dump(),
                    " (each seed draws the mixture, ",
                    "trains, builds the store and attributes its queries).\n");
    TrainingRecipe(c, md);
  }
  if (!c.value("queries", "").empty()) {
    absl::StrAppend(md, "- Queries from `", c.at("queries").get<std::string>(),
                    "`.\n");
  }
  absl::StrAppendFormat(
      md,
      "- Queries: %d held-out images per source, %d timesteps × %d noise "
      "draws per bucket, request seed %d; top-k %d (tracing also %d).\n",
      c.at("queries_per_source").get<int>(), c.at("query_timesteps").get<int>(),
      c.at("noise_draws").get<int>(), c.at("query_seed").get<int>(),
      c.at("top_k").get<int>(), c.at("top_k_wide").get<int>());
  absl::StrAppendFormat(
      md,
      "- Loss grid (plain-loss baseline and LDS outputs): %d timesteps × %d "
      "noise draws, the same for every model.\n\n",
      c.at("grid_timesteps").get<int>(), c.at("grid_draws").get<int>());
}

void Timings(const json& report, std::string* md) {
  const bool described = !report.at("config").value("model", "").empty();
  absl::StrAppend(md, "## Timings\n\n| seed | train | store build | queries | ",
                  "featurize | score | queries/s | loss baseline |\n",
                  "|---|---|---|---|---|---|---|---|\n");
  for (const json& s : report.at("seeds")) {
    const json& t = s.at("timings");
    auto dur = [&](const char* key) {
      if (t.contains(key)) return jobs::FormatDuration(t.at(key).get<double>());
      // A model description is not trained by the eval; other stages found
      // complete on disk were reused.
      return std::string(
          described && std::string(key) == "train_seconds" ? "–" : "reused");
    };
    absl::StrAppend(md, "| ", s.at("seed").dump(), " | ", dur("train_seconds"),
                    " | ", dur("build_seconds"), " | ", Num(t.at("queries")),
                    " | ", dur("featurize_seconds"), " | ",
                    dur("score_seconds"), " | ",
                    Num(t.at("queries_per_second"), 2), " | ",
                    dur("loss_baseline_seconds"), " |\n");
  }
  absl::StrAppend(
      md, "\nqueries/s: the attribution alone (featurize + scan under ",
      "each pairing the store has, every sample ranked), one query at a ",
      "time.\n");
  if (report.contains("fidelity")) {
    absl::StrAppend(
        md, "Projection fidelity: ",
        jobs::FormatDuration(report["fidelity"].value("seconds", 0.0)), ". ");
  }
  if (report.contains("lds")) {
    absl::StrAppend(
        md, "LDS: retraining ",
        jobs::FormatDuration(report["lds"].value("train_seconds", 0.0)),
        ", measuring ",
        jobs::FormatDuration(report["lds"].value("measure_seconds", 0.0)), ".");
  }
  absl::StrAppend(md, "\n\n");
}

void Norms(const json& report, std::string* md) {
  absl::StrAppend(
      md, "## (a) Gradient norm against timestep\n\n",
      "Median ‖g‖ per bucket (training side, from the store); the ",
      "max/min ratio of the medians and Spearman ρ(t, ‖g‖) over all ",
      "(sample, bucket) pairs.\n\n");
  for (const json& s : report.at("seeds")) {
    const json& n = s.at("norms");
    const json& edges = n.at("bucket_edges");
    absl::StrAppend(md, "Seed ", s.at("seed").dump(), ":\n\n| checkpoint |");
    for (size_t b = 0; b + 1 < edges.size(); ++b) {
      absl::StrAppend(md, " t ∈ [", edges[b].dump(), ", ", edges[b + 1].dump(),
                      ") |");
    }
    absl::StrAppend(md, " max/min | ρ(t, ‖g‖) |\n|---|");
    for (size_t b = 0; b + 1 < edges.size(); ++b) absl::StrAppend(md, "---|");
    absl::StrAppend(md, "---|---|\n");
    for (size_t c = 0; c < n.at("median").size(); ++c) {
      absl::StrAppend(md, "| step ", n.at("checkpoint_steps")[c].dump(), " |");
      for (const json& v : n.at("median")[c])
        absl::StrAppend(md, " ", Num(v, 4), " |");
      absl::StrAppend(md, " ", Num(n.at("max_min_ratio")[c], 1), " | ",
                      c < n.at("spearman_t_norm").size()
                          ? Num(n.at("spearman_t_norm")[c])
                          : std::string("–"),
                      " |\n");
    }
    absl::StrAppend(md, "\n");
  }
  absl::StrAppend(md, "![norms](norms.png)\n\n");
}

void Outliers(const json& report, std::string* md) {
  const json& seeds = report.at("seeds");
  const json& first = seeds[0].at("outliers");
  if (first.at("detectors").empty()) {
    absl::StrAppend(md, "## (b) Outlier detection\n\n", first.value("note", ""),
                    ".\n\n");
    return;
  }
  absl::StrAppend(
      md, "## (b) Outlier detection\n\n", first.at("positives").dump(),
      " planted samples among ", first.at("samples").dump(),
      " (first seed). Mean ± sd over seeds (per-seed values in ",
      "brackets). p@N is the precision in the top N; p@planted is the "
      "precision in the top as many as ",
      "there are planted samples.\n\n",
      "| detector | AUROC | average precision | p@10 | p@20 | p@planted |\n",
      "|---|---|---|---|---|---|\n");
  for (size_t i = 0; i < first.at("detectors").size(); ++i) {
    std::vector<double> auroc, ap, p10, p20, pall;
    for (const json& s : seeds) {
      const json& det = s.at("outliers").at("detectors")[i];
      auroc.push_back(D(det.at("auroc")));
      ap.push_back(D(det.at("average_precision")));
      p10.push_back(D(det.at("precision_at").at("10")));
      p20.push_back(D(det.at("precision_at").at("20")));
      pall.push_back(D(
          det.at("precision_at").at(s.at("outliers").at("positives").dump())));
    }
    absl::StrAppend(
        md, "| ", first.at("detectors")[i].at("name").get<std::string>(), " | ",
        Spread(auroc), " | ", Spread(ap), " | ", Spread(p10, 2), " | ",
        Spread(p20, 2), " | ", Spread(pall, 2), " |\n");
  }
  absl::StrAppend(md, "\n![ROC](roc.png)\n\n");
}

void Tracing(const json& report, std::string* md) {
  const json& c = report.at("config");
  const std::string k =
      absl::StrCat("top", c.at("top_k").get<int>(), "_own_share");
  const std::string wide =
      absl::StrCat("top", c.at("top_k_wide").get<int>(), "_own_share");
  absl::StrAppend(
      md, "## (c) Image tracing\n\n", "Share of the top-", c.at("top_k").dump(),
      " and top-", c.at("top_k_wide").dump(),
      " proponents that come from the query's own source, against ",
      "that source's share of the training set (base rate); mean over ",
      "the seeds.\n\n| source | pairing | method | base rate | top-",
      c.at("top_k").dump(), " own | top-", c.at("top_k_wide").dump(),
      " own |\n|---|---|---|---|---|---|\n");
  const json& seeds = report.at("seeds");
  for (size_t r = 0; r < seeds[0].at("tracing").size(); ++r) {
    std::vector<double> base, own_k, own_wide;
    for (const json& s : seeds) {
      const json& row = s.at("tracing")[r];
      base.push_back(D(row.at("base_rate")));
      own_k.push_back(D(row.at(k)));
      own_wide.push_back(D(row.at(wide)));
    }
    const json& row = seeds[0].at("tracing")[r];
    absl::StrAppendFormat(md, "| %s | %s | %s | %.3f | %.3f | %.3f |\n",
                          row.at("source").get<std::string>(),
                          row.at("pairing").get<std::string>(), Method(row),
                          Mean(base), Mean(own_k), Mean(own_wide));
  }
  absl::StrAppend(md, "\n");
}

void General(const json& report, std::string* md) {
  const json& summary = report.at("general_summary");
  const json& first = report.at("seeds")[0].at("general")[0];
  absl::StrAppend(
      md, "## (d) Generally influential samples\n\n", "Over ",
      first.at("queries").dump(),
      " queries per seed (all sources): ", "|G_τ| = samples in the top-",
      first.at("k").dump(),
      " of at least a fraction τ of the queries; unique = distinct ",
      "samples over all top-", first.at("k").dump(),
      " lists; mean pairwise Jaccard of those lists. Mean ± sd over ",
      "seeds (per-seed values in brackets).\n\n",
      "| pairing | method | \\|G_0.2\\| | \\|G_0.5\\| | unique | mean Jaccard "
      "|\n",
      "|---|---|---|---|---|---|\n");
  for (const json& row : summary) {
    auto values = [&](const char* key) {
      return row.at(key).at("values").get<std::vector<double>>();
    };
    absl::StrAppend(md, "| ", row.at("pairing").get<std::string>(), " | ",
                    Method(row), " | ", Spread(values("g_0.2"), 1), " | ",
                    Spread(values("g_0.5"), 1), " | ",
                    Spread(values("unique"), 1), " | ",
                    Spread(values("mean_jaccard")), " |\n");
  }
  std::vector<std::string> ratios;
  for (const json& row : summary) {
    if (row.contains("g_0.2_ratio_to_tracin")) {
      ratios.push_back(
          absl::StrCat(row.at("pairing").get<std::string>(), " ",
                       Num(row["g_0.2_ratio_to_tracin"].at("mean"), 2), " ± ",
                       Num(row["g_0.2_ratio_to_tracin"].at("sd"), 2)));
    }
  }
  absl::StrAppend(
      md,
      "\nReTrac's |G_0.2| as a fraction of TracIn's (mean ± sd over seeds): ",
      absl::StrJoin(ratios, "; "), ".\n\n");
  absl::StrAppend(
      md, "![how many queries a sample is top-k for](influence_hist.png)\n\n");
}

void Fidelity(const json& report, std::string* md) {
  if (!report.contains("fidelity")) return;
  const json& f = report.at("fidelity");
  absl::StrAppend(
      md, "## (e) Projection fidelity\n\n",
      "Matched-pairing scores of the first ", f.at("train_samples").dump(),
      " training samples (seed ", f.at("seed").dump(), ") for ",
      f.at("queries").dump(), " queries, from D-dimensional projections ",
      "against the full ", f.at("parameters").dump(),
      "-dimensional gradients; Spearman over the samples and top-",
      f.at("top_k").dump(), " recall, mean and minimum over the queries. ",
      "Full-dimensional norms agreed with the featurizer's to ",
      absl::StrFormat("%.1e", D(f.at("max_norm_rel_error"))), " relative.\n\n",
      "| D | method | Spearman (mean) | Spearman (min) | recall (mean) | "
      "recall (min) |\n",
      "|---|---|---|---|---|---|\n");
  for (const json& row : f.at("rows")) {
    absl::StrAppend(md, "| ", row.at("dim").dump(), " | ", Method(row), " | ",
                    Num(row.at("spearman_mean"), 4), " | ",
                    Num(row.at("spearman_min"), 4), " | ",
                    Num(row.at("recall_mean")), " | ",
                    Num(row.at("recall_min")), " |\n");
  }
  absl::StrAppend(md, "\n![fidelity](fidelity.png)\n\n");
}

void Lds(const json& report, std::string* md) {
  if (!report.contains("lds")) return;
  const json& l = report.at("lds");
  absl::StrAppend(
      md, "## (f) Linear datamodeling score\n\n", l.at("models").dump(),
      " models retrained with the same recipe (seed ", l.at("seed").dump(),
      ") on random subsets of ", l.at("subset_size").dump(),
      " samples; each query's output is its mean loss over the fixed ",
      "(t, ε) grid under the subset's final checkpoint. LDS = mean over ",
      l.at("queries").dump(),
      " queries of the Spearman correlation, across subsets, between ",
      "−Σ_{n∈S} τ(n) and the measured loss; 95% interval from ",
      l.at("bootstrap_resamples").dump(), " bootstrap resamples of the ",
      "queries.\n\n| pairing | method | LDS | 95% interval "
      "|\n|---|---|---|---|\n");
  for (const json& row : l.at("rows")) {
    absl::StrAppend(md, "| ", row.at("pairing").get<std::string>(), " | ",
                    Method(row), " | ", Num(row.at("mean")), " | [",
                    Num(row.at("ci95")[0]), ", ", Num(row.at("ci95")[1]),
                    "] |\n");
  }
  absl::StrAppend(md, "\n![LDS](lds.png)\n\n");
}

}  // namespace

std::string RenderReportMarkdown(const nlohmann::json& report) {
  std::string md = "# retrace evaluation report\n\n";
  absl::StrAppend(&md,
                  "What came out of `retrace-batch eval` (docs/evaluation.md ",
                  "describes the protocol). No figure here is compared with a ",
                  "threshold.\n\n");
  Config(report, &md);
  Timings(report, &md);
  Norms(report, &md);
  Outliers(report, &md);
  Tracing(report, &md);
  General(report, &md);
  Fidelity(report, &md);
  Lds(report, &md);
  if (report.contains("plots") && report["plots"].contains("error")) {
    absl::StrAppend(&md, "Plots: ", report["plots"]["error"].get<std::string>(),
                    "\n");
  }
  return md;
}

}  // namespace retrace::eval
