// Ranking keys shared by the CPU and CUDA scans (internal to kernels/).
//
// A candidate is one 64-bit integer: the high half orders scores, the low half
// is the complemented sample index. "Better" is simply "larger", which gives
// the contract of scoring.h in a single integer comparison on both backends:
// higher score first (or lower, for the bottom list), then lower index; NaN
// ranks last; -0 equals +0. Zero is never a real candidate, so it serves as
// the "nothing yet" threshold and the padding value.
#ifndef RETRACE_KERNELS_TOPK_H_
#define RETRACE_KERNELS_TOPK_H_

#include <cstdint>

#include "kernels/dtype.h"

namespace retrace::kernels {

// Order-preserving map of a score to 32 bits, larger = better. `top` selects
// the top list (higher scores better) or the bottom list (lower better).
RETRACE_HD uint32_t RankKey(float score, bool top) {
  if (score != score) return 0u;    // NaN: worst in both lists
  if (score == 0.0f) score = 0.0f;  // -0 ranks with +0
  uint32_t bits = FloatBits(score);
  uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  // Every non-NaN score maps to >= 0x007fffff, so 0 stays reserved for NaN.
  return top ? ordered : ~ordered;
}

// Inverse of RankKey (NaN for key 0; -0 comes back as +0).
RETRACE_HD float ScoreFromRankKey(uint32_t key, bool top) {
  if (key == 0u) return BitsFloat(0x7fc00000u);
  uint32_t ordered = top ? key : ~key;
  uint32_t bits = (ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered;
  return BitsFloat(bits);
}

// index must be below kMaxSamples (2^32 - 1), so the low half is never 0.
RETRACE_HD uint64_t PackCandidate(uint32_t key, int64_t index) {
  return (uint64_t{key} << 32) | uint64_t(~uint32_t(index));
}
RETRACE_HD uint32_t CandidateKey(uint64_t c) { return uint32_t(c >> 32); }
RETRACE_HD int64_t CandidateIndex(uint64_t c) {
  return int64_t(~uint32_t(c & 0xffffffffu));
}

}  // namespace retrace::kernels

#endif  // RETRACE_KERNELS_TOPK_H_
