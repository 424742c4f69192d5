#include "server/model/counter_rng.h"

#include <cmath>

#include "kernels/philox.h"

namespace retrace::model {
namespace {

kernels::Philox4x32Block Block(const RngKey& key, uint64_t block) {
  const uint32_t tag = static_cast<uint32_t>(key.stream) << 24;
  kernels::Philox4x32Block counter{{static_cast<uint32_t>(block), key.id0,
                                    key.id1, tag ^ (key.id2 & 0xffffffu)}};
  // Streams longer than 2^32 blocks are not needed (noise for one image); the
  // upper half of the block index is folded into the key so they still differ.
  const uint32_t key0 = static_cast<uint32_t>(key.seed);
  const uint32_t key1 = static_cast<uint32_t>(key.seed >> 32) ^
                        static_cast<uint32_t>(block >> 32);
  return kernels::Philox4x32x10(counter, key0, key1);
}

}  // namespace

uint32_t RandomWord(const RngKey& key, uint64_t index) {
  return Block(key, index / 4).v[index % 4];
}

int64_t UniformInt(const RngKey& key, int64_t lo, int64_t hi) {
  const uint64_t range = static_cast<uint64_t>(hi - lo);
  return lo +
         static_cast<int64_t>((uint64_t{RandomWord(key, 0)} * range) >> 32);
}

void GaussianFill(const RngKey& key, float* out, int64_t count) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  constexpr double kInv2To32 = 1.0 / 4294967296.0;
  for (int64_t i = 0; i < count; i += 2) {
    // Values i and i+1 come from words 2·(i/2) and 2·(i/2)+1.
    const uint64_t pair = static_cast<uint64_t>(i) / 2;
    const kernels::Philox4x32Block b = Block(key, pair / 2);
    const uint32_t w0 = b.v[(pair % 2) * 2];
    const uint32_t w1 = b.v[(pair % 2) * 2 + 1];
    const double u1 = (double(w0) + 1.0) * kInv2To32;
    const double u2 = double(w1) * kInv2To32;
    const double r = std::sqrt(-2.0 * std::log(u1));
    out[i] = static_cast<float>(r * std::cos(kTwoPi * u2));
    if (i + 1 < count)
      out[i + 1] = static_cast<float>(r * std::sin(kTwoPi * u2));
  }
}

}  // namespace retrace::model
