// Turns one attribution request into the generic scan's per-slot weights and
// query vectors (the TracIn and ReTrac scores of docs/scoring.md).
//
// The scan computes, per query,
//   score(n) = Σ_{(c,s)} a_{c,s} · f(n,c,s) · ⟨u_{n,c,s}, q_{c,s}⟩
// with f = ‖g‖ for TracIn and 1 for ReTrac. This file decides a and q:
//   MATCHED: slot s = bucket b meets bucket b of the query; a_{c,b} = w_c for
//   the
//            selected checkpoints and buckets, 0 elsewhere (the replay slot
//            too).
//   REPLAY:  the replay slot meets the query averaged over the selected
//   buckets,
//            q_c = (1/|B_sel|) Σ_{b∈B_sel} q_{c,b}; a_{c,R} = w_c, buckets get
//            0.
// Pure functions; thread-safe.
#ifndef RETRACE_SERVER_SCORING_QUERY_PLAN_H_
#define RETRACE_SERVER_SCORING_QUERY_PLAN_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace retrace::scoring {

enum class Pairing { kMatched, kReplay };

// What the store offers (from its manifest).
struct StoreShape {
  int32_t num_checkpoints = 0;  // C
  int32_t num_buckets = 0;      // B
  bool has_replay = false;  // slots S = B + (has_replay ? 1 : 0); replay last
  int64_t dim = 0;          // D
  std::vector<float> checkpoint_weights;  // w_c, size C

  int32_t num_slots() const { return num_buckets + (has_replay ? 1 : 0); }
};

// Query vectors for every (checkpoint, bucket), as the featurizer (or a
// router) produces them: raw and unit, each [C, B, D] row-major.
struct BucketQuery {
  std::vector<float> raw;
  std::vector<float> unit;
};

struct PlanOptions {
  Pairing pairing = Pairing::kMatched;
  std::vector<int32_t> checkpoints;  // empty: all
  std::vector<int32_t> buckets;      // empty: all
};

// The scan's input for one query: weights [C*S] and vectors [C*S*D] per method.
struct SlotPlan {
  std::vector<float> weight_tracin;
  std::vector<float> weight_retrac;
  std::vector<float> query_raw;
  std::vector<float> query_unit;
};

// Errors (InvalidArgument, naming the problem): an unknown or repeated
// checkpoint or bucket, REPLAY on a store without a replay slot, query vectors
// of the wrong size, NaN/Inf in a query vector (names checkpoint and bucket).
absl::StatusOr<SlotPlan> PlanQuery(const StoreShape& shape,
                                   const BucketQuery& query,
                                   const PlanOptions& options);

}  // namespace retrace::scoring

#endif  // RETRACE_SERVER_SCORING_QUERY_PLAN_H_
