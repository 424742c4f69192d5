// CPU projection against an independent double-precision reference built
// entry by entry from the definition in docs/projection.md, plus the
// determinism, split-invariance, range and JL properties the design asks for.
#include "kernels/projection.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/philox.h"
#include "tests/kernels/projection_test_util.h"

namespace retrace::kernels {
namespace {

// ---- The reference: Philox and the matrix, written from the docs. ----------

// Philox-4x32-10 written out again for the test (not the library's code).
std::vector<uint32_t> RefPhilox(std::vector<uint32_t> x, uint32_t k0,
                                uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t a = 0xD2511F53ull * x[0];
    const uint64_t b = 0xCD9E8D57ull * x[2];
    x = {static_cast<uint32_t>(b >> 32) ^ x[1] ^ k0, static_cast<uint32_t>(b),
         static_cast<uint32_t>(a >> 32) ^ x[3] ^ k1, static_cast<uint32_t>(a)};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return x;
}

std::vector<uint32_t> RefBlock(uint64_t seed, uint64_t i, uint32_t c2,
                               uint32_t domain) {
  return RefPhilox({uint32_t(i & 0xffffffffu), uint32_t(i >> 32), c2, domain},
                   uint32_t(seed & 0xffffffffu), uint32_t(seed >> 32));
}

// Entry (row j, global column i) of P, in double.
double RefEntry(const ProjectionSpec& spec, uint64_t i, int64_t j) {
  if (spec.type == ProjectionType::kRademacher) {
    const std::vector<uint32_t> w =
        RefBlock(spec.seed, i, uint32_t(j / 128), 0x52414445u);
    const int r = int(j % 128);
    const bool negative = (w[r / 32] >> (r % 32)) & 1u;
    return (negative ? -1.0 : 1.0) / std::sqrt(double(spec.output_dim));
  }
  const int s = spec.sparsity;
  const int64_t d = spec.output_dim;
  for (int k = 0; k < s; ++k) {
    const uint32_t w =
        RefBlock(spec.seed, i, uint32_t(k / 4), 0x534A4C54u)[k % 4];
    const int64_t begin = k * d / s;
    const int64_t size = (k + 1) * d / s - begin;
    // floor((w >> 1) / 2^31 · size), exactly, in integers.
    const int64_t row =
        begin + int64_t((uint64_t(w >> 1) * uint64_t(size)) >> 31);
    if (row == j) return ((w & 1u) ? -1.0 : 1.0) / std::sqrt(double(s));
  }
  return 0.0;
}

struct Piece {
  int64_t begin;  // index into the test's input vector
  int64_t len;
};

// Reference output [B, D] of the pieces (at global_base + begin) and, per
// output, an error bound: each input is rounded to 2^-32 before summing
// (|error| <= 2^-33 · |entry| per term) and the sum is rounded to float.
void Reference(const ProjectionSpec& spec, const std::vector<double>& x,
               int64_t batch, int64_t p, uint64_t global_base, double scale,
               const std::vector<Piece>& pieces, std::vector<double>* out,
               std::vector<double>* bound) {
  const int64_t d = spec.output_dim;
  out->assign(batch * d, 0.0);
  bound->assign(batch * d, 0.0);
  for (const Piece& piece : pieces) {
    for (int64_t c = piece.begin; c < piece.begin + piece.len; ++c) {
      for (int64_t j = 0; j < d; ++j) {
        const double e = RefEntry(spec, global_base + uint64_t(c), j);
        if (e == 0.0) continue;
        for (int64_t b = 0; b < batch; ++b) {
          (*out)[b * d + j] += e * (x[b * p + c] * scale);
          (*bound)[b * d + j] += std::fabs(e) * std::ldexp(1.0, -33);
        }
      }
    }
  }
  for (int64_t e = 0; e < batch * d; ++e) {
    (*bound)[e] += std::fabs((*out)[e]) * std::ldexp(1.0, -23) + 1e-300;
  }
}

// ---- Helpers around the library. -------------------------------------------

struct Projected {
  std::vector<uint64_t> accumulator;
  std::vector<float> output;
};

// Projects the pieces of x ([batch, p] row-major) in the given order, each
// copied into its own buffer with a padded row stride, at global_base.
Projected ProjectPieces(const ProjectionSpec& spec, const std::vector<float>& x,
                        int64_t batch, int64_t p, uint64_t global_base,
                        double scale, const std::vector<Piece>& pieces,
                        int threads = 0, CpuIsa isa = CpuIsa::kAuto) {
  Projected run;
  run.accumulator.assign(ProjectionAccumulatorWords(spec, batch), 0xdead);
  EXPECT_TRUE(ProjectResetCpu(spec, batch, run.accumulator.data()).ok());
  for (const Piece& piece : pieces) {
    const int64_t stride = piece.len + 3;
    std::vector<float> buf(batch * stride, std::nanf(""));
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < piece.len; ++i) {
        buf[b * stride + i] = x[b * p + piece.begin + i];
      }
    }
    const KernelStatus s =
        ProjectAccumulateCpu(spec, buf.data(), batch, piece.len, stride,
                             int64_t(global_base) + piece.begin, scale,
                             run.accumulator.data(), threads, isa);
    EXPECT_TRUE(s.ok()) << s.ToString();
  }
  run.output.assign(batch * spec.output_dim, 0.0f);
  const KernelStatus s = ProjectFinalizeCpu(spec, run.accumulator.data(), batch,
                                            run.output.data());
  EXPECT_TRUE(s.ok()) << s.ToString();
  return run;
}

std::vector<Piece> RandomSplit(int64_t p, std::mt19937_64& rng,
                               int64_t max_len) {
  std::vector<Piece> pieces;
  for (int64_t at = 0; at < p;) {
    const int64_t len = std::min<int64_t>(
        p - at, std::uniform_int_distribution<int64_t>(0, max_len)(rng));
    pieces.push_back({at, len});
    at += len;
  }
  std::shuffle(pieces.begin(), pieces.end(), rng);
  return pieces;
}

using testing::RandomInput;

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

ProjectionSpec Sjlt(int64_t d, int s, uint64_t seed = 7) {
  ProjectionSpec spec;
  spec.type = ProjectionType::kSjlt;
  spec.output_dim = d;
  spec.sparsity = s;
  spec.seed = seed;
  return spec;
}

ProjectionSpec Dense(int64_t d, uint64_t seed = 7) {
  ProjectionSpec spec;
  spec.type = ProjectionType::kRademacher;
  spec.output_dim = d;
  spec.seed = seed;
  return spec;
}

std::string Describe(const ProjectionSpec& spec) {
  return std::string(ProjectionTypeName(spec.type)) +
         " D=" + std::to_string(spec.output_dim) +
         " s=" + std::to_string(spec.sparsity) +
         " seed=" + std::to_string(spec.seed);
}

// ---- Philox.
// -----------------------------------------------------------------

TEST(PhiloxTest, KnownAnswerVectors) {
  // Random123's published known-answer vectors for Philox-4x32-10.
  struct Case {
    uint32_t counter[4];
    uint32_t key[2];
    uint32_t expected[4];
  };
  const Case cases[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Case& c : cases) {
    const Philox4x32Block out =
        Philox4x32x10(Philox4x32Block{{c.counter[0], c.counter[1], c.counter[2],
                                       c.counter[3]}},
                      c.key[0], c.key[1]);
    const std::vector<uint32_t> ref =
        RefPhilox({c.counter[0], c.counter[1], c.counter[2], c.counter[3]},
                  c.key[0], c.key[1]);
    for (int w = 0; w < 4; ++w) {
      SCOPED_TRACE(w);
      EXPECT_EQ(out.v[w], c.expected[w]);
      EXPECT_EQ(ref[w], c.expected[w]);
    }
  }
}

// ---- Validation.
// -------------------------------------------------------------

void ExpectInvalid(const KernelStatus& s, const std::string& mentions) {
  EXPECT_EQ(s.code(), KernelCode::kInvalidArgument) << s.ToString();
  EXPECT_NE(s.message().find(mentions), std::string::npos)
      << "message \"" << s.message() << "\" should mention \"" << mentions
      << "\"";
}

TEST(ProjectionSpecTest, RejectsBadSpecs) {
  EXPECT_TRUE(ValidateProjectionSpec(ProjectionSpec()).ok());
  ExpectInvalid(ValidateProjectionSpec(Sjlt(0, 1)), "output dimension D");
  ExpectInvalid(ValidateProjectionSpec(Dense(-3)), "output dimension D");
  ExpectInvalid(ValidateProjectionSpec(Dense(kMaxProjectionDim + 1)),
                "output dimension D");
  ExpectInvalid(ValidateProjectionSpec(Sjlt(64, 0)), "sparsity s");
  ExpectInvalid(ValidateProjectionSpec(Sjlt(64, 9)), "sparsity s");
  ExpectInvalid(ValidateProjectionSpec(Sjlt(3, 4)), "exceeds the output");
  ProjectionSpec bad_p = Sjlt(64, 4);
  bad_p.input_dim = -1;
  ExpectInvalid(ValidateProjectionSpec(bad_p), "input dimension p");
  ProjectionSpec bad_type = Sjlt(64, 4);
  bad_type.type = static_cast<ProjectionType>(7);
  ExpectInvalid(ValidateProjectionSpec(bad_type), "type");
  // s is irrelevant to the dense type.
  ProjectionSpec dense = Dense(2);
  dense.sparsity = 0;
  EXPECT_TRUE(ValidateProjectionSpec(dense).ok());
  EXPECT_EQ(ProjectionAccumulatorWords(Sjlt(0, 1), 1), -1);
  EXPECT_EQ(ProjectionAccumulatorWords(Sjlt(8, 1), 0), -1);
  EXPECT_EQ(ProjectionAccumulatorWords(Sjlt(8, 1), 3), 8 * 3 + 6);
}

TEST(ProjectionSpecTest, TypeNamesRoundTrip) {
  for (ProjectionType t :
       {ProjectionType::kSjlt, ProjectionType::kRademacher}) {
    ProjectionType parsed;
    ASSERT_TRUE(ParseProjectionType(ProjectionTypeName(t), &parsed));
    EXPECT_EQ(parsed, t);
  }
  ProjectionType parsed;
  EXPECT_FALSE(ParseProjectionType("gaussian", &parsed));
}

TEST(ProjectionArgsTest, RejectsBadArguments) {
  ProjectionSpec spec = Sjlt(16, 2);
  spec.input_dim = 100;
  std::vector<uint64_t> acc(ProjectionAccumulatorWords(spec, 2));
  std::vector<float> x(2 * 50, 1.0f);
  std::vector<float> out(2 * 16);
  ASSERT_TRUE(ProjectResetCpu(spec, 2, acc.data()).ok());
  auto accumulate = [&](const float* v, int64_t batch, int64_t len,
                        int64_t stride, int64_t offset, double scale,
                        uint64_t* a, int threads = 0) {
    return ProjectAccumulateCpu(spec, v, batch, len, stride, offset, scale, a,
                                threads);
  };
  ExpectInvalid(accumulate(nullptr, 2, 50, 50, 0, 1.0, acc.data()), "values");
  ExpectInvalid(accumulate(x.data(), 2, 50, 50, 0, 1.0, nullptr),
                "accumulator");
  ExpectInvalid(accumulate(x.data(), 0, 50, 50, 0, 1.0, acc.data()), "batch");
  ExpectInvalid(accumulate(x.data(), -1, 50, 50, 0, 1.0, acc.data()), "batch");
  ExpectInvalid(accumulate(x.data(), 2, -1, 50, 0, 1.0, acc.data()), "length");
  ExpectInvalid(accumulate(x.data(), 2, 50, 49, 0, 1.0, acc.data()),
                "row_stride");
  ExpectInvalid(accumulate(x.data(), 2, 50, 50, -1, 1.0, acc.data()),
                "global_offset");
  ExpectInvalid(accumulate(x.data(), 2, 50, 50, 51, 1.0, acc.data()),
                "beyond the declared input dimension p = 100");
  ExpectInvalid(
      accumulate(x.data(), 2, 50, 50, std::numeric_limits<int64_t>::max(), 1.0,
                 acc.data()),
      "overflows");
  ExpectInvalid(accumulate(x.data(), 2, 50, 50, 0, std::nan(""), acc.data()),
                "input_scale");
  ExpectInvalid(accumulate(x.data(), 2, 50, 50, 0, INFINITY, acc.data()),
                "input_scale");
  ExpectInvalid(accumulate(x.data(), 2, 50, 50, 0, 1.0, acc.data(), -1),
                "num_threads");
  ExpectInvalid(ProjectFinalizeCpu(spec, acc.data(), 2, nullptr), "output");
  ExpectInvalid(ProjectFinalizeCpu(spec, nullptr, 2, out.data()),
                "accumulator");
  ExpectInvalid(ProjectResetCpu(spec, 2, nullptr), "accumulator");
  ExpectInvalid(ProjectResetCpu(Sjlt(16, 0), 2, acc.data()), "sparsity");
  // The piece ending exactly at p is fine; nothing was added by the refusals.
  EXPECT_TRUE(accumulate(x.data(), 2, 50, 50, 50, 1.0, acc.data()).ok());
  // An empty piece, even with a null pointer, is a no-op.
  std::vector<uint64_t> before = acc;
  EXPECT_TRUE(accumulate(nullptr, 2, 0, 0, 100, 1.0, acc.data()).ok());
  EXPECT_EQ(acc, before);
}

// ---- Against the reference.
// --------------------------------------------------

struct ReferenceCase {
  ProjectionSpec spec;
  int64_t batch;
  double scale;
  uint64_t global_base;
};

void PrintTo(const ReferenceCase& c, std::ostream* os) {
  *os << Describe(c.spec) << " B=" << c.batch << " scale=" << c.scale
      << " base=" << c.global_base;
}

class ProjectionReferenceTest : public ::testing::TestWithParam<ReferenceCase> {
};

TEST_P(ProjectionReferenceTest, MatchesNaiveDoubleLoop) {
  const ReferenceCase& c = GetParam();
  const int64_t p = 1500;
  const uint64_t data_seed = 1234 + c.spec.output_dim;
  SCOPED_TRACE(Describe(c.spec) + " B=" + std::to_string(c.batch) +
               " scale=" + std::to_string(c.scale) +
               " base=" + std::to_string(c.global_base) +
               " data_seed=" + std::to_string(data_seed));
  const std::vector<float> x = RandomInput(c.batch * p, data_seed);
  std::mt19937_64 rng(data_seed);
  const std::vector<Piece> pieces = RandomSplit(p, rng, 400);
  const Projected run =
      ProjectPieces(c.spec, x, c.batch, p, c.global_base, c.scale, pieces);
  std::vector<double> xd(x.begin(), x.end());
  std::vector<double> ref, bound;
  Reference(c.spec, xd, c.batch, p, c.global_base, c.scale, pieces, &ref,
            &bound);
  int64_t nonzero = 0;
  for (size_t e = 0; e < ref.size(); ++e) {
    SCOPED_TRACE(e);
    EXPECT_NEAR(run.output[e], ref[e], bound[e]);
    nonzero += ref[e] != 0.0;
  }
  EXPECT_GT(nonzero, int64_t(ref.size()) / 2);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ProjectionReferenceTest,
    ::testing::Values(
        ReferenceCase{Sjlt(1, 1), 1, 1.0, 0},
        ReferenceCase{Sjlt(7, 3), 2, 0.5, 0},
        ReferenceCase{Sjlt(64, 4), 3, 1.0, 12345},
        ReferenceCase{Sjlt(130, 8), 1, 1e-3, 0},
        ReferenceCase{Sjlt(257, 5), 2, 3.0, 99},
        ReferenceCase{Sjlt(33, 1, 0xfedcba9876543210ull), 1, 1.0, 0},
        ReferenceCase{Dense(1), 2, 1.0, 0},
        ReferenceCase{Dense(130), 1, 0.25, 77},
        ReferenceCase{Dense(300, 0xfedcba9876543210ull), 3, 1.0, 0}));

TEST(ProjectionTest, OffsetsBeyond32BitsHashTheWholeCoordinate) {
  // Small pieces at huge global offsets, straddling 2^32 and far beyond it.
  const uint64_t bases[] = {(uint64_t{1} << 32) - 7, (uint64_t{1} << 40) + 3,
                            (uint64_t{1} << 62) + 11};
  for (const ProjectionSpec& spec : {Sjlt(64, 4), Sjlt(50, 6), Dense(130)}) {
    for (uint64_t base : bases) {
      SCOPED_TRACE(Describe(spec) + " base=" + std::to_string(base));
      const int64_t p = 40, batch = 2;
      const std::vector<float> x = RandomInput(batch * p, base);
      const std::vector<Piece> pieces = {{0, 13}, {13, 1}, {14, 26}};
      const Projected run = ProjectPieces(spec, x, batch, p, base, 1.0, pieces);
      std::vector<double> ref, bound;
      Reference(spec, std::vector<double>(x.begin(), x.end()), batch, p, base,
                1.0, pieces, &ref, &bound);
      for (size_t e = 0; e < ref.size(); ++e) {
        SCOPED_TRACE(e);
        EXPECT_NEAR(run.output[e], ref[e], bound[e]);
      }
    }
    // Coordinates i and i + 2^32 have different columns.
    const std::vector<float> one = {1.0f};
    const Projected low = ProjectPieces(spec, one, 1, 1, 5, 1.0, {{0, 1}});
    const Projected high =
        ProjectPieces(spec, one, 1, 1, (uint64_t{1} << 32) + 5, 1.0, {{0, 1}});
    EXPECT_FALSE(SameBits(low.output, high.output)) << Describe(spec);
  }
}

TEST(ProjectionTest, SjltColumnsHaveSDistinctRowsOnePerBlock) {
  for (const ProjectionSpec& spec : {Sjlt(37, 5), Sjlt(8, 8), Sjlt(1024, 4)}) {
    SCOPED_TRACE(Describe(spec));
    const int s = spec.sparsity;
    const float magnitude = float(1.0 / std::sqrt(double(s)));
    for (int64_t i = 0; i < 200; ++i) {
      const std::vector<float> one = {1.0f};
      const Projected run =
          ProjectPieces(spec, one, 1, 1, uint64_t(i) * 977, 1.0, {{0, 1}});
      std::vector<int> per_block(s, 0);
      int nonzeros = 0;
      for (int64_t j = 0; j < spec.output_dim; ++j) {
        if (run.output[j] == 0.0f) continue;
        ++nonzeros;
        EXPECT_EQ(std::fabs(run.output[j]), magnitude);
        int k = 0;
        while ((k + 1) * spec.output_dim / s <= j) ++k;
        ++per_block[k];
      }
      EXPECT_EQ(nonzeros, s) << "column " << i;
      for (int k = 0; k < s; ++k) EXPECT_EQ(per_block[k], 1) << "block " << k;
    }
  }
}

// ---- Determinism.
// ------------------------------------------------------------

TEST(ProjectionTest, AnySplitGivesIdenticalBits) {
  const int64_t p = 60000, batch = 3;
  const std::vector<float> x = RandomInput(batch * p, 42);
  for (const ProjectionSpec& spec : {Sjlt(256, 4), Sjlt(100, 7), Dense(200)}) {
    SCOPED_TRACE(Describe(spec));
    const Projected whole =
        ProjectPieces(spec, x, batch, p, 1000, 0.01, {{0, p}});
    for (uint64_t split_seed : {1u, 2u, 3u}) {
      SCOPED_TRACE("split_seed=" + std::to_string(split_seed));
      std::mt19937_64 rng(split_seed);
      const int64_t max_len = split_seed == 1 ? 3 : 20000;
      if (max_len < 10 && spec.type == ProjectionType::kRademacher) continue;
      const Projected split = ProjectPieces(spec, x, batch, p, 1000, 0.01,
                                            RandomSplit(p, rng, max_len));
      EXPECT_EQ(split.accumulator, whole.accumulator);
      EXPECT_TRUE(SameBits(split.output, whole.output));
    }
  }
}

TEST(ProjectionTest, ThreadCountDoesNotChangeBits) {
  const int64_t batch = 2;
  for (const auto& [spec, p] : {std::pair{Sjlt(512, 4), int64_t{200000}},
                                std::pair{Sjlt(64, 8), int64_t{100000}},
                                std::pair{Dense(1000), int64_t{40000}}}) {
    SCOPED_TRACE(Describe(spec));
    const std::vector<float> x = RandomInput(batch * p, 5);
    const Projected one =
        ProjectPieces(spec, x, batch, p, 0, 1e-2, {{0, p}}, 1);
    for (int threads : {2, 3, 5, 8}) {
      SCOPED_TRACE("threads=" + std::to_string(threads));
      const Projected many =
          ProjectPieces(spec, x, batch, p, 0, 1e-2, {{0, p}}, threads);
      EXPECT_EQ(many.accumulator, one.accumulator);
      EXPECT_TRUE(SameBits(many.output, one.output));
    }
  }
}

// Every instruction set this CPU has gives the generic path's accumulator
// bit for bit: batches that fill the eight-vector blocks and ones that leave
// a tail, pieces whose length leaves a tail of the eight-coordinate steps,
// padded rows (the padding is NaN, so a read past a row would show), columns
// that are all zero, and values at the range's edge.
TEST(ProjectionIsaTest, EveryInstructionSetGivesTheGenericBits) {
  const int64_t p = 3001;
  for (int64_t batch : {1, 3, 8, 13, 64}) {
    std::vector<float> x = RandomInput(batch * p, 17 + batch);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 100; i < 140; ++i) x[b * p + i] = 0.0f;   // zero columns
      x[b * p + 7] = (b % 2 ? -1.0f : 1.0f) * 524288.0f / 1024;  // large
      x[b * p + 8] = 1e-30f;  // rounds to zero
    }
    std::mt19937_64 rng(batch);
    const std::vector<Piece> pieces = RandomSplit(p, rng, 700);
    for (const ProjectionSpec& spec :
         {Sjlt(1024, 4), Sjlt(37, 3), Dense(130)}) {
      SCOPED_TRACE(Describe(spec) + " B=" + std::to_string(batch));
      const Projected generic = ProjectPieces(spec, x, batch, p, 5, 1.0 / 1024,
                                              pieces, 0, CpuIsa::kScalar);
      for (CpuIsa isa : SupportedCpuIsas()) {
        SCOPED_TRACE(CpuIsaName(isa));
        const Projected run =
            ProjectPieces(spec, x, batch, p, 5, 1.0 / 1024, pieces, 0, isa);
        EXPECT_EQ(run.accumulator, generic.accumulator);
        EXPECT_TRUE(SameBits(run.output, generic.output));
      }
    }
  }
}

// A bad value in any vector (inside an eight-vector block, in its tail rows,
// in the coordinates after the last eight, in a batch of one) is refused by
// every instruction set with the same message, and the L1 counters match.
TEST(ProjectionIsaTest, EveryInstructionSetRefusesTheSameBadValues) {
  const ProjectionSpec spec = Sjlt(64, 4);
  const int64_t len = 21;
  // (batch, row, column) of the bad value.
  for (const auto& [batch, row, col] :
       {std::tuple<int64_t, int64_t, int64_t>{11, 0, 3},
        {11, 6, 15},
        {11, 9, 2},
        {11, 3, 19},
        {11, 10, 20},
        {1, 0, 5},
        {1, 0, 17}}) {
    for (const float bad : {std::nanf(""), INFINITY, 600000.0f}) {
      SCOPED_TRACE(
          "B=" + std::to_string(batch) + " row=" + std::to_string(row) +
          " col=" + std::to_string(col) + " value=" + std::to_string(bad));
      std::vector<float> x = RandomInput(batch * len, 3);
      x[row * len + col] = bad;
      std::vector<uint64_t> generic(ProjectionAccumulatorWords(spec, batch), 0);
      const KernelStatus expected =
          ProjectAccumulateCpu(spec, x.data(), batch, len, len, 0, 1.0,
                               generic.data(), 1, CpuIsa::kScalar);
      ASSERT_FALSE(expected.ok());
      EXPECT_NE(expected.message().find("vector " + std::to_string(row)),
                std::string::npos)
          << expected.message();
      for (CpuIsa isa : SupportedCpuIsas()) {
        SCOPED_TRACE(CpuIsaName(isa));
        std::vector<uint64_t> acc(generic.size(), 0);
        const KernelStatus s = ProjectAccumulateCpu(
            spec, x.data(), batch, len, len, 0, 1.0, acc.data(), 1, isa);
        EXPECT_EQ(s.message(), expected.message());
        EXPECT_EQ(acc, generic);
      }
    }
  }
}

// An instruction set the CPU lacks is refused before anything is added.
TEST(ProjectionIsaTest, InstructionSetsThisCpuLacksAreUnavailable) {
  const ProjectionSpec spec = Sjlt(16, 2);
  const std::vector<float> x(2 * 10, 1.0f);
  const std::vector<CpuIsa> supported = SupportedCpuIsas();
  for (CpuIsa isa :
       {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAmx}) {
    std::vector<uint64_t> acc(ProjectionAccumulatorWords(spec, 2), 0);
    const KernelStatus s = ProjectAccumulateCpu(spec, x.data(), 2, 10, 10, 0,
                                                1.0, acc.data(), 0, isa);
    if (std::find(supported.begin(), supported.end(), isa) != supported.end()) {
      EXPECT_TRUE(s.ok()) << CpuIsaName(isa) << ": " << s.ToString();
    } else {
      std::printf("[ SKIPPED  ] %s: this CPU lacks it; checked it is refused\n",
                  CpuIsaName(isa));
      EXPECT_EQ(s.code(), KernelCode::kUnavailable) << s.ToString();
      EXPECT_EQ(acc, std::vector<uint64_t>(acc.size(), 0));
    }
  }
}

TEST(ProjectionTest, SameSeedSameBitsOtherSeedOtherMatrix) {
  const int64_t p = 5000;
  const std::vector<float> x = RandomInput(p, 9);
  for (ProjectionSpec spec : {Sjlt(128, 4, 11), Dense(128, 11)}) {
    SCOPED_TRACE(Describe(spec));
    const Projected a = ProjectPieces(spec, x, 1, p, 0, 1.0, {{0, p}});
    const Projected b = ProjectPieces(spec, x, 1, p, 0, 1.0, {{0, p}});
    EXPECT_TRUE(SameBits(a.output, b.output));
    spec.seed = 12;
    const Projected c = ProjectPieces(spec, x, 1, p, 0, 1.0, {{0, p}});
    int differ = 0;
    for (size_t j = 0; j < a.output.size(); ++j)
      differ += a.output[j] != c.output[j];
    EXPECT_GT(differ, int(a.output.size()) * 9 / 10);
    // The two types draw from separate counter domains.
    spec.seed = 11;
    spec.type = spec.type == ProjectionType::kSjlt ? ProjectionType::kRademacher
                                                   : ProjectionType::kSjlt;
    const Projected d = ProjectPieces(spec, x, 1, p, 0, 1.0, {{0, p}});
    EXPECT_FALSE(SameBits(a.output, d.output));
  }
}

TEST(ProjectionTest, InputScaleIsExactForPowersOfTwo) {
  const int64_t p = 3000;
  const std::vector<float> x = RandomInput(p, 3);
  std::vector<float> quarter(x);
  for (float& v : quarter) v *= 0.25f;
  for (const ProjectionSpec& spec : {Sjlt(64, 4), Dense(64)}) {
    const Projected scaled = ProjectPieces(spec, x, 1, p, 0, 0.25, {{0, p}});
    const Projected prescaled =
        ProjectPieces(spec, quarter, 1, p, 0, 1.0, {{0, p}});
    EXPECT_TRUE(SameBits(scaled.output, prescaled.output)) << Describe(spec);
  }
}

TEST(ProjectionTest, ZerosProjectToZeros) {
  const std::vector<float> zeros(2 * 1000, 0.0f);
  for (const ProjectionSpec& spec : {Sjlt(32, 2), Dense(32)}) {
    const Projected run =
        ProjectPieces(spec, zeros, 2, 1000, 0, 1.0, {{0, 1000}});
    for (float v : run.output) EXPECT_EQ(v, 0.0f);
  }
}

// ---- Range of the fixed-point format.
// -----------------------------------------

TEST(ProjectionRangeTest, RefusesNonFiniteAndTooLargeValues) {
  const ProjectionSpec spec = Sjlt(16, 2);
  std::vector<uint64_t> acc(ProjectionAccumulatorWords(spec, 2));
  std::vector<float> out(2 * 16);
  const float bad_values[] = {std::nanf(""), INFINITY, -INFINITY, 524289.0f};
  const char* mentions[] = {"NaN", "NaN", "NaN", "2^19"};
  for (int v = 0; v < 4; ++v) {
    SCOPED_TRACE(bad_values[v]);
    ASSERT_TRUE(ProjectResetCpu(spec, 2, acc.data()).ok());
    std::vector<float> x(2 * 10, 1.0f);
    x[10 + 4] = bad_values[v];  // vector 1
    ExpectInvalid(
        ProjectAccumulateCpu(spec, x.data(), 2, 10, 10, 0, 1.0, acc.data()),
        mentions[v]);
    ExpectInvalid(ProjectFinalizeCpu(spec, acc.data(), 2, out.data()),
                  "input vector 1");
    // Sticky: a later good piece does not clear it; Reset does.
    std::vector<float> good(2 * 10, 1.0f);
    EXPECT_FALSE(
        ProjectAccumulateCpu(spec, good.data(), 2, 10, 10, 10, 1.0, acc.data())
            .ok());
    ASSERT_TRUE(ProjectResetCpu(spec, 2, acc.data()).ok());
    EXPECT_TRUE(
        ProjectAccumulateCpu(spec, good.data(), 2, 10, 10, 10, 1.0, acc.data())
            .ok());
    EXPECT_TRUE(ProjectFinalizeCpu(spec, acc.data(), 2, out.data()).ok());
  }
  // The bound itself is accepted, and input_scale decides what is checked.
  ASSERT_TRUE(ProjectResetCpu(spec, 2, acc.data()).ok());
  std::vector<float> big(2 * 10, 524288.0f);
  EXPECT_TRUE(
      ProjectAccumulateCpu(spec, big.data(), 2, 10, 10, 0, 1.0, acc.data())
          .ok());
  big[3] = 3e30f;
  EXPECT_TRUE(
      ProjectAccumulateCpu(spec, big.data(), 2, 10, 10, 10, 1e-30, acc.data())
          .ok());
  // A finite input whose product with the scale overflows double is caught.
  ExpectInvalid(
      ProjectAccumulateCpu(spec, big.data(), 2, 10, 10, 20, 1e300, acc.data()),
      "NaN or Inf");
}

TEST(ProjectionRangeTest, L1BoundIsTrackedAcrossPieces) {
  // D = s = 1: every value lands in the single row, the worst case for
  // overflow. 4095 values of 2^19 sum to 2^31 - 2^19: accepted and exact.
  const ProjectionSpec spec = Sjlt(1, 1);
  std::vector<uint64_t> acc(ProjectionAccumulatorWords(spec, 1));
  ASSERT_TRUE(ProjectResetCpu(spec, 1, acc.data()).ok());
  const std::vector<float> x(4095, 524288.0f);
  ASSERT_TRUE(
      ProjectAccumulateCpu(spec, x.data(), 1, 1000, 1000, 0, 1.0, acc.data())
          .ok());
  ASSERT_TRUE(
      ProjectAccumulateCpu(spec, x.data(), 1, 3095, 3095, 1000, 1.0, acc.data())
          .ok());
  float out = 0;
  ASSERT_TRUE(ProjectFinalizeCpu(spec, acc.data(), 1, &out).ok());
  double ref = 0;
  for (int64_t i = 0; i < 4095; ++i) ref += RefEntry(spec, i, 0) * 524288.0;
  EXPECT_EQ(out, float(ref));
  // One more value reaches 2^31: refused, whichever piece crosses the line.
  ExpectInvalid(
      ProjectAccumulateCpu(spec, x.data(), 1, 1, 1, 4095, 1.0, acc.data()),
      "L1");
  ExpectInvalid(ProjectFinalizeCpu(spec, acc.data(), 1, &out), "L1");
}

// ---- Johnson–Lindenstrauss properties over many seeds.
// ------------------------
//
// For both types and unit x, y with ⟨x, y⟩ = c:
//   E‖Px‖² = 1,       Var ‖Px‖²   = (2/D)(1 - ‖x‖₄⁴)          ≈ 2/D,
//   E⟨Px, Py⟩ = c,    Var ⟨Px, Py⟩ = (1/D)(1 + c² - 2Σx²y²)   ≈ (1 + c²)/D.
// (For SJLT: s independent CountSketch blocks of D/s rows each; for dense:
// D independent Rademacher rows.) Each seed is held to the subgaussian JL
// tail P(|err| > ε) <= 2·exp(-D·ε²/8), with ε chosen so that all checks of
// the test together fail by chance with probability < 1e-6; the mean over
// seeds is held to 6 standard errors and the spread to chi-square quantiles.
TEST(ProjectionJlTest, NormsAndInnerProductsPreservedOverSeeds) {
  constexpr int kSeeds = 50;
  constexpr int64_t kD = 512;
  constexpr int64_t kP = 4096;
  const std::vector<ProjectionSpec> specs = {Sjlt(kD, 4), Sjlt(kD, 1),
                                             Sjlt(kD, 8), Dense(kD)};
  const double checks = double(kSeeds) * 2 * double(specs.size());
  const double delta = 1e-6 / checks;
  const double eps = std::sqrt(8.0 * std::log(2.0 / delta) / kD);

  std::vector<float> xy = RandomInput(2 * kP, 2024);
  double nx = 0, ny = 0, dot = 0;
  for (int64_t i = 0; i < kP; ++i) {
    nx += double(xy[i]) * xy[i];
    ny += double(xy[kP + i]) * xy[kP + i];
  }
  // y = 0.6 x/‖x‖ + 0.8 z/‖z‖ (approximately): a correlated pair, c ≈ 0.6.
  for (int64_t i = 0; i < kP; ++i) {
    xy[kP + i] =
        float(0.6 * xy[i] / std::sqrt(nx) + 0.8 * xy[kP + i] / std::sqrt(ny));
  }
  nx = ny = 0;
  for (int64_t i = 0; i < kP; ++i) {
    nx += double(xy[i]) * xy[i];
    ny += double(xy[kP + i]) * xy[kP + i];
    dot += double(xy[i]) * xy[kP + i];
  }
  // Normalize through input_scale, as the service does: only one scale per
  // call, so project x and y separately.
  const double cosine = dot / std::sqrt(nx * ny);

  for (ProjectionSpec spec : specs) {
    SCOPED_TRACE(Describe(spec) + " eps=" + std::to_string(eps));
    std::vector<double> norm_err, ip_err;
    for (int seed = 0; seed < kSeeds; ++seed) {
      spec.seed = 1000 + seed;
      const std::vector<float> xs(xy.begin(), xy.begin() + kP);
      const std::vector<float> ys(xy.begin() + kP, xy.end());
      const Projected px =
          ProjectPieces(spec, xs, 1, kP, 0, 1.0 / std::sqrt(nx), {{0, kP}});
      const Projected py =
          ProjectPieces(spec, ys, 1, kP, 0, 1.0 / std::sqrt(ny), {{0, kP}});
      double pxx = 0, pxy = 0;
      for (int64_t j = 0; j < kD; ++j) {
        pxx += double(px.output[j]) * px.output[j];
        pxy += double(px.output[j]) * py.output[j];
      }
      norm_err.push_back(pxx - 1.0);
      ip_err.push_back(pxy - cosine);
      EXPECT_LE(std::fabs(norm_err.back()), eps) << "seed " << spec.seed;
      EXPECT_LE(std::fabs(ip_err.back()), eps) << "seed " << spec.seed;
    }
    auto check_spread = [&](const std::vector<double>& err, double variance,
                            const char* what) {
      double mean = 0, sq = 0;
      for (double e : err) {
        mean += e;
        sq += e * e;
      }
      mean /= kSeeds;
      sq /= kSeeds;
      SCOPED_TRACE(std::string(what) + " mean=" + std::to_string(mean) +
                   " mean_square=" + std::to_string(sq) +
                   " expected variance=" + std::to_string(variance));
      EXPECT_LE(std::fabs(mean), 6.0 * std::sqrt(variance / kSeeds));
      // Σe²/σ² ~ χ²(50): P(< 15) and P(> 110) are both below 1e-5.
      EXPECT_GE(sq / variance, 15.0 / kSeeds);
      EXPECT_LE(sq / variance, 110.0 / kSeeds);
    };
    check_spread(norm_err, 2.0 / kD, "squared norm");
    check_spread(ip_err, (1.0 + cosine * cosine) / kD, "inner product");
  }
}

// ---- Projector.
// ----------------------------------------------------------------

TEST(ProjectorTest, CpuProjectorMatchesFreeFunctions) {
  const ProjectionSpec spec = Sjlt(96, 3);
  const int64_t p = 7000, batch = 2;
  const std::vector<float> x = RandomInput(batch * p, 8);
  std::unique_ptr<Projector> projector;
  ASSERT_TRUE(
      Projector::Create(spec, batch, Backend::kCpu, nullptr, &projector).ok());
  EXPECT_EQ(projector->batch(), batch);
  EXPECT_EQ(projector->backend(), Backend::kCpu);
  // Pieces laid out in place: row stride p.
  ASSERT_TRUE(projector->Accumulate(x.data(), 3000, p, 0).ok());
  ASSERT_TRUE(projector->Accumulate(x.data() + 3000, 4000, p, 3000).ok());
  std::vector<float> out(batch * 96);
  ASSERT_TRUE(projector->Finalize(out.data()).ok());
  const Projected ref = ProjectPieces(spec, x, batch, p, 0, 1.0, {{0, p}});
  EXPECT_TRUE(SameBits(out, ref.output));
  ASSERT_TRUE(projector->Reset().ok());
  ASSERT_TRUE(projector->Finalize(out.data()).ok());
  for (float v : out) EXPECT_EQ(v, 0.0f);

  std::unique_ptr<Projector> bad;
  ExpectInvalid(Projector::Create(Sjlt(0, 1), 1, Backend::kCpu, nullptr, &bad),
                "output dimension");
  ExpectInvalid(Projector::Create(spec, 0, Backend::kCpu, nullptr, &bad),
                "batch");
}

TEST(ProjectorTest, CudaIsUnavailableWithoutDevice) {
  if (CudaDeviceAvailable()) GTEST_SKIP() << "a CUDA device is present";
  std::unique_ptr<Projector> projector;
  const KernelStatus s =
      Projector::Create(Sjlt(64, 4), 1, Backend::kCuda, nullptr, &projector);
  EXPECT_EQ(s.code(), KernelCode::kUnavailable) << s.ToString();
  EXPECT_EQ(projector, nullptr);
  std::vector<uint64_t> acc(ProjectionAccumulatorWords(Sjlt(64, 4), 1));
  EXPECT_EQ(ProjectResetCuda(Sjlt(64, 4), 1, acc.data(), nullptr).code(),
            KernelCode::kUnavailable);
}

}  // namespace
}  // namespace retrace::kernels
