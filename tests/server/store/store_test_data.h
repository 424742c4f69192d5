// Deterministic test data for store tests and the interop tool.
//
// Every stored value is a pure function of (seed, sample, field, position),
// built from a 64-bit integer mixer, so that a Python script can recompute it
// with numpy alone. Values are exact in float32 (k / 2^16 and similar), which
// keeps both sides free of libm differences; the fp16/bf16 encodings then
// differ only if a conversion is wrong.
#ifndef RETRACE_TESTS_SERVER_STORE_STORE_TEST_DATA_H_
#define RETRACE_TESTS_SERVER_STORE_STORE_TEST_DATA_H_

#include <cstdint>
#include <string>
#include <vector>

#include "server/store/manifest.h"
#include "server/store/store_writer.h"

namespace retrace::store::testing {

// Field tags mixed into the hash so that each field has its own stream.
enum Field : uint64_t {
  kFieldVector = 0,
  kFieldNorm = 1,
  kFieldLabel = 2,
  kFieldTracIn = 3,
  kFieldReTrac = 4,
  kFieldTimestep = 5,
};

// splitmix64's output function; a bijection on 64-bit integers.
inline uint64_t Mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

// Hash of (seed, field, position): Mix(seed ^ Mix(position * 8 + field)).
inline uint64_t FieldHash(uint64_t seed, Field field, uint64_t position) {
  return Mix(seed ^ Mix(position * 8 + uint64_t(field)));
}

// vectors[n][c][s][d]: k / 2^16 with k uniform in [-65536, 65536]; position
// is the flat index ((n*C + c)*S + s)*D + d.
inline float VectorValue(uint64_t seed, uint64_t flat_index) {
  int64_t k =
      int64_t(FieldHash(seed, kFieldVector, flat_index) % 131073) - 65536;
  return float(k) / 65536.0f;
}
// norms[n][c][s]: (h mod 2^16) / 2^8, position ((n*C + c)*S + s).
inline float NormValue(uint64_t seed, uint64_t flat_index) {
  return float(FieldHash(seed, kFieldNorm, flat_index) % 65536) / 256.0f;
}
inline int64_t SampleIdValue(uint64_t n) {
  return int64_t(5000000000ll + 3 * n);
}
inline int32_t LabelValue(uint64_t seed, uint64_t n) {
  return int32_t(FieldHash(seed, kFieldLabel, n) % 10);
}
// self_influence[n][0] (TracIn) and [1] (ReTrac): (h mod 2^16 - 2^15) / 2^7.
inline float SelfInfluenceValue(uint64_t seed, uint64_t n, int column) {
  Field f = column == 0 ? kFieldTracIn : kFieldReTrac;
  return float(int64_t(FieldHash(seed, f, n) % 65536) - 32768) / 128.0f;
}
// train_timesteps[n][c]: h mod T, position n*C + c.
inline int32_t TimestepValue(uint64_t seed, uint64_t flat_index,
                             int64_t timesteps) {
  return int32_t(FieldHash(seed, kFieldTimestep, flat_index) %
                 uint64_t(timesteps));
}

// A small valid spec: `num_checkpoints` checkpoints, `edges` bucket edges over
// T = 1000, D = dim, dataset provenance carrying the data seed.
StoreSpec MakeSpec(kernels::DType dtype, bool replay, int64_t samples_per_shard,
                   int64_t num_checkpoints = 2,
                   std::vector<int64_t> edges = {0, 400, 1000},
                   int64_t dim = 12, uint64_t data_seed = 7);

// Owns the arrays of one sample computed from the formulas above.
struct SampleData {
  std::vector<float> vectors;
  std::vector<float> norms;
  std::vector<int32_t> train_timesteps;
  SampleRecord record;  // points into the vectors above
};
void FillSample(const StoreSpec& spec, uint64_t seed, int64_t n,
                SampleData* out);

// Builds a finished store of `num_samples` samples from the formulas, or
// resumes an unfinished build of them in `dir`; file I/O through `env`.
absl::StatusOr<Manifest> BuildStore(const std::string& dir,
                                    const StoreSpec& spec, int64_t num_samples,
                                    uint64_t seed, Env* env = Env::Default());

}  // namespace retrace::store::testing

#endif  // RETRACE_TESTS_SERVER_STORE_STORE_TEST_DATA_H_
