// Test driver for store_interop_test.py.
//
//   store_interop_tool write DIR DTYPE   builds a store from the formulas in
//                                        store_test_data.h (37 samples,
//                                        10 per shard, C = 2, B = 3 + replay,
//                                        D = 12, data seed 7)
//   store_interop_tool check DIR         opens DIR (verifying checksums) and
//                                        checks every stored value against the
//                                        same formulas, with the dimensions and
//                                        the data seed
//                                        (dataset.provenance.seed) taken from
//                                        its manifest
//
// Exit status: 0 on success, 1 on a value mismatch, 2 when the store cannot be
// written or opened (the error goes to stderr), 64 on a usage error.
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>

#include "kernels/dtype.h"
#include "server/store/store_reader.h"
#include "tests/server/store/store_test_data.h"

namespace retrace::store {
namespace {

using kernels::DType;

int Write(const std::string& dir, const std::string& dtype_name) {
  DType dtype;
  if (!kernels::ParseDType(dtype_name.c_str(), &dtype)) {
    std::cerr << "unknown dtype " << dtype_name << "\n";
    return 64;
  }
  StoreSpec spec =
      testing::MakeSpec(dtype, /*replay=*/true, /*samples_per_shard=*/10,
                        /*num_checkpoints=*/2, {0, 250, 600, 1000}, /*dim=*/12,
                        /*data_seed=*/7);
  absl::StatusOr<Manifest> m = testing::BuildStore(dir, spec, 37, 7);
  if (!m.ok()) {
    std::cerr << m.status() << "\n";
    return 2;
  }
  std::cout << "wrote " << m->num_samples << " samples in " << m->shards.size()
            << " shards to " << dir << "\n";
  return 0;
}

// Bits of the formula value encoded in `dtype`, as stored.
uint32_t EncodedBits(float value, DType dtype) {
  switch (dtype) {
    case DType::kF16:
      return kernels::FloatToHalf(value);
    case DType::kBF16:
      return kernels::FloatToBf16(value);
    case DType::kF32:
      return kernels::FloatBits(value);
  }
  return 0;
}

uint32_t StoredBits(const void* vectors, int64_t index, DType dtype) {
  const uint8_t* p =
      static_cast<const uint8_t*>(vectors) + index * kernels::DTypeSize(dtype);
  if (dtype == DType::kF32) {
    uint32_t u;
    std::memcpy(&u, p, 4);
    return u;
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}

int Check(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<StoreReader>> opened = StoreReader::Open(dir);
  if (!opened.ok()) {
    std::cerr << opened.status() << "\n";
    return 2;
  }
  const StoreReader& r = **opened;
  const nlohmann::json& dataset = r.manifest().spec.dataset;
  if (!dataset.contains("provenance") ||
      !dataset["provenance"].contains("seed")) {
    std::cerr << "manifest.json: dataset.provenance.seed missing\n";
    return 2;
  }
  const uint64_t seed = dataset["provenance"]["seed"].get<uint64_t>();
  const int64_t C = r.num_checkpoints(), S = r.num_slots(), D = r.dim();
  const int64_t T = r.manifest().spec.noise_schedule.timesteps;
  int64_t mismatches = 0;
  auto mismatch = [&](int64_t n, const char* what, int64_t i, auto got,
                      auto want) {
    if (++mismatches <= 10) {
      std::cerr << "sample " << n << " " << what << "[" << i << "]: got " << got
                << ", expected " << want << "\n";
    }
  };
  for (const SampleBlock& b : r.shards()) {
    for (int64_t k = 0; k < b.count; ++k) {
      const int64_t n = b.first + k;
      const uint8_t* row =
          static_cast<const uint8_t*>(b.vectors) + k * r.row_bytes();
      for (int64_t i = 0; i < C * S * D; ++i) {
        uint32_t want = EncodedBits(
            testing::VectorValue(seed, uint64_t(n * C * S * D + i)), r.dtype());
        uint32_t got = StoredBits(row, i, r.dtype());
        if (got != want) mismatch(n, "vectors", i, got, want);
      }
      for (int64_t i = 0; i < C * S; ++i) {
        float want = testing::NormValue(seed, uint64_t(n * C * S + i));
        if (b.norms[k * C * S + i] != want)
          mismatch(n, "norms", i, b.norms[k * C * S + i], want);
      }
      if (b.sample_ids[k] != testing::SampleIdValue(uint64_t(n))) {
        mismatch(n, "sample_ids", 0, b.sample_ids[k],
                 testing::SampleIdValue(uint64_t(n)));
      }
      if (b.labels[k] != testing::LabelValue(seed, uint64_t(n))) {
        mismatch(n, "labels", 0, b.labels[k],
                 testing::LabelValue(seed, uint64_t(n)));
      }
      for (int col = 0; col < 2; ++col) {
        float want = testing::SelfInfluenceValue(seed, uint64_t(n), col);
        if (b.self_influence[2 * k + col] != want) {
          mismatch(n, "self_influence", col, b.self_influence[2 * k + col],
                   want);
        }
      }
      if (r.has_replay()) {
        for (int64_t c = 0; c < C; ++c) {
          int32_t want = testing::TimestepValue(seed, uint64_t(n * C + c), T);
          if (b.train_timesteps[k * C + c] != want) {
            mismatch(n, "train_timesteps", c, b.train_timesteps[k * C + c],
                     want);
          }
        }
      }
    }
  }
  if (mismatches > 0) {
    std::cerr << mismatches << " mismatches\n";
    return 1;
  }
  std::cout << "ok: " << r.num_samples() << " samples in " << r.num_shards()
            << " shards, " << kernels::DTypeName(r.dtype()) << ", C=" << C
            << " S=" << S << " D=" << D << "\n";
  return 0;
}

}  // namespace
}  // namespace retrace::store

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "write" && argc == 4)
    return retrace::store::Write(argv[2], argv[3]);
  if (mode == "check" && argc == 3) return retrace::store::Check(argv[2]);
  std::cerr << "usage: store_interop_tool write DIR DTYPE | check DIR\n";
  return 64;
}
