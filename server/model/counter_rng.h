// Counter-based random draws for training, featurization and queries.
//
// Every draw is a pure function of (seed, stream, id0, id1, id2, position)
// through Philox-4x32-10 (kernels/philox.h), so any sample's timesteps and
// noise can be regenerated on their own, bit for bit, on any machine and in
// any order: training noise is never stored, only its keys.
//
// Philox key   = (seed & 0xffffffff, seed >> 32)
// Philox counter for 4-word block `block` =
//   {block, id0, id1, (stream << 24) ^ id2}        (id2 < 2^24)
// Word w of the output stream is word (w % 4) of block w / 4.
//
// Keys used in retrace (docs/featurization.md):
//   kTrainTimestep / kTrainNoise: (run seed; step, batch position, 0)
//   kBuildTimestep / kBuildNoise: (store seed; n, c << 16 | b, j)
//   kQueryNoise:                  (request seed; c, bucket << 16 | s_index, r)
// Thread-safe (no state).
#ifndef RETRACE_SERVER_MODEL_COUNTER_RNG_H_
#define RETRACE_SERVER_MODEL_COUNTER_RNG_H_

#include <cstdint>

namespace retrace::model {

enum class RngStream : uint32_t {
  kTrainTimestep = 1,
  kTrainNoise = 2,
  kBuildTimestep = 3,
  kBuildNoise = 4,
  kQueryNoise = 5,
};

struct RngKey {
  uint64_t seed = 0;
  RngStream stream = RngStream::kTrainNoise;
  uint32_t id0 = 0;
  uint32_t id1 = 0;
  uint32_t id2 = 0;  // must be < 2^24
};

// Word `index` of the key's stream.
uint32_t RandomWord(const RngKey& key, uint64_t index);

// An integer in [lo, hi) from word 0 of the stream: lo + floor(w·(hi−lo)/2^32).
// (The bias is below (hi−lo)/2^32, under 3e-7 for T = 1000.)
int64_t UniformInt(const RngKey& key, int64_t lo, int64_t hi);

// Fills out[0..count) with standard normal values: Box–Muller in double on
// consecutive word pairs (w0, w1): u1 = (w0 + 1) / 2^32, u2 = w1 / 2^32,
// z0 = sqrt(−2 ln u1)·cos(2π u2), z1 = sqrt(−2 ln u1)·sin(2π u2), rounded to
// float. Value i depends only on the key and i.
void GaussianFill(const RngKey& key, float* out, int64_t count);

}  // namespace retrace::model

#endif  // RETRACE_SERVER_MODEL_COUNTER_RNG_H_
