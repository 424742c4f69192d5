#include "server/scoring/query_plan.h"

#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"

namespace retrace::scoring {
namespace {

// Expands a filter into a membership mask of size n; empty selects all.
absl::StatusOr<std::vector<char>> Select(const std::vector<int32_t>& filter,
                                         int32_t n, const char* what) {
  std::vector<char> mask(n, filter.empty() ? 1 : 0);
  for (int32_t v : filter) {
    if (v < 0 || v >= n) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown ", what, " ", v, ": the store has ", n, " ",
                       what, "s (0..", n - 1, ")"));
    }
    if (mask[v]) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " ", v, " is listed twice"));
    }
    mask[v] = 1;
  }
  return mask;
}

}  // namespace

absl::StatusOr<SlotPlan> PlanQuery(const StoreShape& shape,
                                   const BucketQuery& query,
                                   const PlanOptions& options) {
  const int32_t c_count = shape.num_checkpoints;
  const int32_t b_count = shape.num_buckets;
  const int32_t s_count = shape.num_slots();
  const int64_t d = shape.dim;
  const size_t expected = static_cast<size_t>(c_count) * b_count * d;
  if (static_cast<int32_t>(shape.checkpoint_weights.size()) != c_count) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint weights: expected ", c_count, ", got ",
                     shape.checkpoint_weights.size()));
  }
  if (query.raw.size() != expected || query.unit.size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        "query vectors: expected ", c_count, " checkpoints x ", b_count,
        " buckets x ", d, " dims = ", expected, " values each, got raw=",
        query.raw.size(), " unit=", query.unit.size()));
  }
  if (options.pairing == Pairing::kReplay && !shape.has_replay) {
    return absl::InvalidArgumentError(
        "pairing REPLAY needs a replay slot, and this store has none (built "
        "without a training replay log); use MATCHED");
  }
  for (size_t i = 0; i < expected; ++i) {
    if (!std::isfinite(query.raw[i]) || !std::isfinite(query.unit[i])) {
      const int64_t cb = static_cast<int64_t>(i) / d;
      return absl::InvalidArgumentError(absl::StrCat(
          "query vector has a non-finite value (NaN or Inf) at checkpoint ",
          cb / b_count, ", bucket ", cb % b_count, ", element ", i % d));
    }
  }
  std::vector<char> use_c, use_b;
  {
    auto c = Select(options.checkpoints, c_count, "checkpoint");
    if (!c.ok()) return c.status();
    use_c = *std::move(c);
    auto b = Select(options.buckets, b_count, "bucket");
    if (!b.ok()) return b.status();
    use_b = *std::move(b);
  }

  SlotPlan plan;
  const size_t slots = static_cast<size_t>(c_count) * s_count;
  plan.weight_tracin.assign(slots, 0.0f);
  plan.weight_retrac.assign(slots, 0.0f);
  plan.query_raw.assign(slots * d, 0.0f);
  plan.query_unit.assign(slots * d, 0.0f);

  auto copy_bucket = [&](int32_t c, int32_t b, int32_t s, float scale) {
    const size_t src = (static_cast<size_t>(c) * b_count + b) * d;
    const size_t dst = (static_cast<size_t>(c) * s_count + s) * d;
    for (int64_t j = 0; j < d; ++j) {
      plan.query_raw[dst + j] += scale * query.raw[src + j];
      plan.query_unit[dst + j] += scale * query.unit[src + j];
    }
  };

  int32_t selected_buckets = 0;
  for (char u : use_b) selected_buckets += u;
  for (int32_t c = 0; c < c_count; ++c) {
    if (!use_c[c]) continue;
    const float w = shape.checkpoint_weights[c];
    if (options.pairing == Pairing::kMatched) {
      for (int32_t b = 0; b < b_count; ++b) {
        if (!use_b[b]) continue;
        plan.weight_tracin[c * s_count + b] = w;
        plan.weight_retrac[c * s_count + b] = w;
        copy_bucket(c, b, b, 1.0f);
      }
    } else {
      const int32_t replay = b_count;
      plan.weight_tracin[c * s_count + replay] = w;
      plan.weight_retrac[c * s_count + replay] = w;
      for (int32_t b = 0; b < b_count; ++b) {
        if (use_b[b]) copy_bucket(c, b, replay, 1.0f / selected_buckets);
      }
    }
  }
  return plan;
}

}  // namespace retrace::scoring
