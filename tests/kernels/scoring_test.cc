// CPU scoring scan against a brute-force double-precision loop, plus the
// properties the contract promises: exact tie-breaking, chunk/thread/batch
// independence, breakdowns that sum to the score, exact merging, validation.
#include "kernels/scoring.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "kernels/device.h"
#include "tests/kernels/scoring_test_util.h"

namespace retrace::kernels {
namespace {

using testing::BruteForce;
using testing::CpuScanRelErr;
using testing::ExpectIdentical;
using testing::ExpectMatchesReference;
using testing::MakeQueries;
using testing::MakeStore;
using testing::Reference;
using testing::TestQueries;
using testing::TestStore;

const char* IsaName(CpuIsa isa) { return CpuIsaName(isa); }

// kAuto and every instruction set this CPU supports (the generic path is
// always among them).
std::vector<CpuIsa> IsasToTest() {
  std::vector<CpuIsa> isas = {CpuIsa::kAuto};
  for (CpuIsa isa : SupportedCpuIsas()) isas.push_back(isa);
  return isas;
}

struct Case {
  DType dtype;
  int c, s, d;
  int64_t rows;
  int32_t queries;
  int32_t k;  // 0: k = rows
  bool want_bottom;
};

std::string Describe(const Case& p, uint64_t seed, CpuIsa isa) {
  return std::string("dtype=") + DTypeName(p.dtype) +
         " C=" + std::to_string(p.c) + " S=" + std::to_string(p.s) +
         " D=" + std::to_string(p.d) + " N=" + std::to_string(p.rows) +
         " Q=" + std::to_string(p.queries) + " k=" + std::to_string(p.k) +
         " bottom=" + std::to_string(p.want_bottom) + " isa=" + IsaName(isa) +
         " seed=" + std::to_string(seed);
}

void PrintTo(const Case& p, std::ostream* os) {
  *os << DTypeName(p.dtype) << " C=" << p.c << " S=" << p.s << " D=" << p.d
      << " N=" << p.rows << " Q=" << p.queries << " k=" << p.k;
}

class ScanCpuBruteForceTest : public ::testing::TestWithParam<Case> {};

TEST_P(ScanCpuBruteForceTest, MatchesDoublePrecisionLoop) {
  const Case& p = GetParam();
  const uint64_t seed =
      1000 + uint64_t(p.d) * 7 + uint64_t(p.rows) * 13 + uint64_t(p.queries);
  const TestStore st = MakeStore(p.dtype, p.c, p.s, p.d, p.rows, seed);
  const TestQueries qs = MakeQueries(st.layout, p.queries, seed + 1);
  const Reference ref = BruteForce(st, qs);
  const int32_t k = p.k == 0 ? int32_t(p.rows) : p.k;
  for (CpuIsa isa : IsasToTest()) {
    SCOPED_TRACE(Describe(p, seed, isa));
    ScanOptions opt;
    opt.k = k;
    opt.want_bottom = p.want_bottom;
    opt.isa = isa;
    ScanResult result;
    KernelStatus status =
        ScanCpu(st.layout, {st.Chunk()}, qs.Batch(), opt, &result);
    ASSERT_TRUE(status.ok()) << status.ToString();
    ExpectMatchesReference(result, ref, p.rows, k, p.want_bottom,
                           CpuScanRelErr(isa, p.dtype));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ScanCpuBruteForceTest,
    ::testing::Values(
        // N = 1 and k = N = 1.
        Case{DType::kF16, 1, 1, 8, 1, 1, 1, true},
        Case{DType::kF32, 2, 3, 1, 1, 64, 1, true},
        // D not a multiple of 8, N not a multiple of any block.
        Case{DType::kF16, 2, 6, 1, 37, 1, 5, true},
        Case{DType::kBF16, 1, 2, 3, 101, 2, 0, true},
        Case{DType::kF32, 3, 2, 17, 257, 4, 17, true},
        Case{DType::kF16, 1, 11, 100, 129, 5, 1, false},
        Case{DType::kBF16, 2, 6, 1000, 45, 3, 45, true},
        Case{DType::kF32, 1, 1, 4096, 33, 7, 10, true},
        Case{DType::kF16, 1, 2, 4096, 19, 1, 19, true},
        // Q = 64, every dtype; k = N.
        Case{DType::kF16, 2, 2, 24, 70, 64, 0, true},
        Case{DType::kBF16, 1, 3, 13, 50, 64, 3, true},
        Case{DType::kF32, 2, 1, 40, 65, 64, 64, false},
        // Many rows, large k relative to the per-thread buffers.
        Case{DType::kF16, 1, 2, 16, 3001, 2, 1000, true},
        Case{DType::kBF16, 2, 6, 64, 800, 8, 1, true}));

TestStore ConstantStore(int64_t rows, const StoreLayout& layout) {
  TestStore st = MakeStore(layout.dtype, layout.checkpoints, layout.slots,
                           layout.dim, 1, 7);
  TestStore out = st;
  out.rows = rows;
  out.bytes.clear();
  out.norms.clear();
  for (int64_t n = 0; n < rows; ++n) {
    out.bytes.insert(out.bytes.end(), st.bytes.begin(), st.bytes.end());
    out.norms.insert(out.norms.end(), st.norms.begin(), st.norms.end());
  }
  return out;
}

// Three queries offer six columns per row, which every instruction set takes
// one by one; five offer ten, which the AVX-512 bookkeeping takes eight at a
// time and the last two alone.
TEST(ScanCpuTest, TiesGoToTheLowestIndices) {
  for (CpuIsa isa : IsasToTest()) {
    for (int nq : {3, 5}) {
      for (int threads : {1, 2, 3}) {
        SCOPED_TRACE("isa=" + std::string(IsaName(isa)) +
                     " queries=" + std::to_string(nq) +
                     " threads=" + std::to_string(threads) + " seed=7");
        const TestStore st =
            ConstantStore(500, StoreLayout{DType::kF16, 2, 3, 33});
        const TestQueries qs = MakeQueries(st.layout, nq, 8);
        ScanOptions opt;
        opt.k = 40;
        opt.num_threads = threads;
        opt.isa = isa;
        ScanResult result;
        ASSERT_TRUE(ScanCpu(st.layout, {st.Chunk(0, 250), st.Chunk(250)},
                            qs.Batch(), opt, &result)
                        .ok());
        for (int q = 0; q < nq; ++q) {
          for (int m = 0; m < kNumMethods; ++m) {
            const RankedList& list = result.Get(q, static_cast<Method>(m));
            for (int i = 0; i < opt.k; ++i) {
              EXPECT_EQ(list.top[size_t(i)].index, i);
              EXPECT_EQ(list.bottom[size_t(i)].index, i);
              EXPECT_EQ(list.top[size_t(i)].score, list.top[0].score);
            }
          }
        }
      }
    }
  }
}

// Scans `st` with `nq` random queries (from `seed`) whose TracIn and ReTrac
// weights are all `weight`.
ScanResult ScanWithEqualWeights(const TestStore& st, int nq, uint64_t seed,
                                float weight, CpuIsa isa, int32_t k) {
  TestQueries qs = MakeQueries(st.layout, nq, seed);
  std::fill(qs.tracin_weights.begin(), qs.tracin_weights.end(), weight);
  std::fill(qs.retrac_weights.begin(), qs.retrac_weights.end(), weight);
  ScanOptions opt;
  opt.k = k;
  opt.isa = isa;
  ScanResult result;
  const KernelStatus status =
      ScanCpu(st.layout, {st.Chunk()}, qs.Batch(), opt, &result);
  EXPECT_TRUE(status.ok()) << status.ToString();
  return result;
}

TEST(ScanCpuTest, ZeroScoresTieRegardlessOfSign) {
  // All weights 0: every score is +-0, so the lowest indices win both lists.
  const TestStore st = MakeStore(DType::kF32, 1, 2, 9, 60, 11);
  for (CpuIsa isa : IsasToTest()) {
    for (int nq : {2, 5}) {
      SCOPED_TRACE("isa=" + std::string(IsaName(isa)) +
                   " queries=" + std::to_string(nq) + " seed=12");
      const ScanResult result = ScanWithEqualWeights(st, nq, 12, 0.0f, isa, 5);
      for (int q = 0; q < nq; ++q) {
        for (int i = 0; i < 5; ++i) {
          EXPECT_EQ(result.Get(q, Method::kReTrac).top[size_t(i)].index, i);
          EXPECT_EQ(result.Get(q, Method::kReTrac).bottom[size_t(i)].index, i);
          EXPECT_EQ(result.Get(q, Method::kTracIn).top[size_t(i)].score, 0.0f);
          EXPECT_FALSE(std::signbit(
              result.Get(q, Method::kTracIn).top[size_t(i)].score));
        }
      }
    }
  }
}

TEST(ScanCpuTest, BreakdownSumsToScoreAndMatchesReference) {
  for (CpuIsa isa : IsasToTest()) {
    for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32}) {
      const uint64_t seed = 21 + uint64_t(dtype);
      SCOPED_TRACE(std::string("dtype=") + DTypeName(dtype) +
                   " isa=" + IsaName(isa) + " seed=" + std::to_string(seed));
      const TestStore st = MakeStore(dtype, 2, 5, 77, 300, seed);
      const TestQueries qs = MakeQueries(st.layout, 4, seed + 1);
      const Reference ref = BruteForce(st, qs);
      ScanOptions opt;
      opt.k = 8;
      opt.want_breakdown = true;
      opt.isa = isa;
      ScanResult result;
      ASSERT_TRUE(ScanCpu(st.layout, {st.Chunk(0, 123), st.Chunk(123)},
                          qs.Batch(), opt, &result)
                      .ok());
      const int64_t cs_count = st.layout.SlotPairs();
      for (int q = 0; q < 4; ++q) {
        for (int m = 0; m < kNumMethods; ++m) {
          const RankedList& list = result.Get(q, static_cast<Method>(m));
          for (const auto* samples : {&list.top, &list.bottom}) {
            for (const ScoredSample& s : *samples) {
              ASSERT_EQ(s.breakdown.size(), size_t(cs_count));
              double sum = 0, abs_sum = 0;
              for (int64_t cs = 0; cs < cs_count; ++cs) {
                const double want = ref.breakdown[size_t(
                    ((s.index * 4 + q) * 2 + m) * cs_count + cs)];
                EXPECT_NEAR(
                    s.breakdown[size_t(cs)], want,
                    CpuScanRelErr(isa, dtype) * ref.Magnitude(s.index, q, m));
                sum += s.breakdown[size_t(cs)];
                abs_sum += std::fabs(s.breakdown[size_t(cs)]);
              }
              // The contributions are the very terms of the score, rounded to
              // float once each.
              EXPECT_NEAR(sum, s.score, 4e-7 * abs_sum + 1e-30)
                  << "index " << s.index;
            }
          }
        }
      }
    }
  }
}

void ExpectChunkSplitsAndMergesEqualOneChunk(DType dtype, int dim, CpuIsa isa);

// Also what the matrix-unit path reads: whole 16-row tiles of a bf16 store
// whose dim is a multiple of 32 straight from the store, the tails and single
// rows through a zero-padded copy, which must give the same bits.
TEST(ScanCpuTest, ChunkSplitsAndMergesEqualOneChunk) {
  for (CpuIsa isa : IsasToTest()) {
    for (DType dtype : {DType::kBF16, DType::kF16}) {
      for (int dim : {21, 64}) {
        SCOPED_TRACE(std::string("isa=") + IsaName(isa) + " dtype=" +
                     DTypeName(dtype) + " D=" + std::to_string(dim));
        ExpectChunkSplitsAndMergesEqualOneChunk(dtype, dim, isa);
      }
    }
  }
}

void ExpectChunkSplitsAndMergesEqualOneChunk(DType dtype, int dim, CpuIsa isa) {
  const uint64_t seed = 31;
  SCOPED_TRACE("seed=31");
  const TestStore st = MakeStore(dtype, 2, 3, dim, 211, seed);
  const TestQueries qs = MakeQueries(st.layout, 5, seed + 1);
  ScanOptions opt;
  opt.k = 30;
  opt.want_breakdown = true;
  opt.isa = isa;
  ScanResult whole;
  ASSERT_TRUE(ScanCpu(st.layout, {st.Chunk()}, qs.Batch(), opt, &whole).ok());

  // Uneven chunks, single rows, given out of index order.
  std::vector<StoreChunk> chunks = {st.Chunk(100, 1), st.Chunk(0, 37),
                                    st.Chunk(37, 63), st.Chunk(150, 61),
                                    st.Chunk(101, 49)};
  ScanResult split;
  ASSERT_TRUE(ScanCpu(st.layout, chunks, qs.Batch(), opt, &split).ok());
  ExpectIdentical(whole, split);

  // Shards scanned separately (each with k capped by its size), then merged.
  std::vector<ScanResult> parts;
  for (const StoreChunk& c : chunks) {
    ScanOptions part_opt = opt;
    part_opt.k = int32_t(std::min<int64_t>(opt.k, c.rows));
    parts.emplace_back();
    ASSERT_TRUE(
        ScanCpu(st.layout, {c}, qs.Batch(), part_opt, &parts.back()).ok());
  }
  ScanResult merged;
  KernelStatus status = MergeScanResults(parts, opt.k, &merged);
  ASSERT_TRUE(status.ok()) << status.ToString();
  ExpectIdentical(whole, merged);
}

// Multiplying a query's vectors by a power of two multiplies its scores by
// exactly that (no path's arithmetic depends on the scale: the fp32 chains
// scale exactly, and the matrix unit's split query is taken from the vector
// divided by a power of two of its own largest value).
TEST(ScanCpuTest, ScoresScaleExactlyWithThePowersOfTwoOfTheQuery) {
  for (CpuIsa isa : IsasToTest()) {
    for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32}) {
      SCOPED_TRACE(std::string("isa=") + IsaName(isa) +
                   " dtype=" + DTypeName(dtype) + " seed=71");
      const TestStore st = MakeStore(dtype, 1, 3, 96, 120, 71);
      const TestQueries qs = MakeQueries(st.layout, 3, 72);
      ScanOptions opt;
      opt.k = 120;
      opt.isa = isa;
      ScanResult base;
      ASSERT_TRUE(
          ScanCpu(st.layout, {st.Chunk()}, qs.Batch(), opt, &base).ok());
      for (int e : {-30, 17}) {
        SCOPED_TRACE("2^" + std::to_string(e));
        TestQueries scaled = qs;
        for (float& x : scaled.raw) x = std::ldexp(x, e);
        for (float& x : scaled.unit) x = std::ldexp(x, e);
        ScanResult result;
        ASSERT_TRUE(
            ScanCpu(st.layout, {st.Chunk()}, scaled.Batch(), opt, &result)
                .ok());
        for (int q = 0; q < 3; ++q) {
          for (int m = 0; m < kNumMethods; ++m) {
            const RankedList& a = base.Get(q, static_cast<Method>(m));
            const RankedList& b = result.Get(q, static_cast<Method>(m));
            ASSERT_EQ(a.top.size(), b.top.size());
            for (size_t i = 0; i < a.top.size(); ++i) {
              EXPECT_EQ(b.top[i].index, a.top[i].index) << "rank " << i;
              EXPECT_EQ(b.top[i].score, std::ldexp(a.top[i].score, e))
                  << "rank " << i;
            }
          }
        }
      }
    }
  }
}

// fp16 stores hold values from 2^-24 (subnormal) to 65504; the matrix-unit
// path splits each into two bf16 values, which must be exact at both ends
// and for every significand, and queries whose values span many binades.
TEST(ScanCpuTest, ExtremeStoreAndQueryValuesStayWithinTolerance) {
  for (CpuIsa isa : IsasToTest()) {
    SCOPED_TRACE(std::string("isa=") + IsaName(isa) + " seed=75");
    TestStore st = MakeStore(DType::kF16, 1, 2, 64, 40, 75);
    std::mt19937_64 rng(75);
    std::uniform_int_distribution<uint16_t> bits(0, 0x7BFF);  // finite
    const float specials[] = {65504.0f,        -65504.0f, 0x1p-24f,
                              -0x1p-24f,       0x1p-14f,  0x1.ffcp-15f,
                              1.0f + 0x1p-10f, 0.0f,      -0.0f};
    for (int64_t i = 0; i < st.rows * st.layout.RowValues(); ++i) {
      float v;
      if (i % 7 == 0) {
        v = specials[size_t(i / 7) % (sizeof(specials) / sizeof(float))];
      } else {
        const uint16_t h = uint16_t(bits(rng) | ((i & 1) ? 0x8000u : 0u));
        v = HalfToFloat(h);
      }
      testing::StoreValue(&st, i, v);
    }
    TestQueries qs = MakeQueries(st.layout, 2, 76);
    for (size_t i = 0; i < qs.raw.size(); ++i) {
      qs.raw[i] = std::ldexp(qs.raw[i], int(i % 41) - 20);
      qs.unit[i] = std::ldexp(qs.unit[i], -int(i % 23));
    }
    ScanOptions opt;
    opt.k = 40;
    opt.isa = isa;
    ScanResult result;
    ASSERT_TRUE(
        ScanCpu(st.layout, {st.Chunk()}, qs.Batch(), opt, &result).ok());
    ExpectMatchesReference(result, BruteForce(st, qs), st.rows, opt.k, true,
                           CpuScanRelErr(isa, DType::kF16));
  }
}

TEST(ScanCpuTest, IndependentOfThreadCount) {
  SCOPED_TRACE("seed=41");
  const TestStore st = MakeStore(DType::kF16, 2, 6, 50, 700, 41);
  const TestQueries qs = MakeQueries(st.layout, 9, 42);
  ScanOptions opt;
  opt.k = 64;
  opt.num_threads = 1;
  ScanResult one;
  ASSERT_TRUE(ScanCpu(st.layout, {st.Chunk()}, qs.Batch(), opt, &one).ok());
  for (int threads : {2, 3, 8}) {
    SCOPED_TRACE("threads=" + std::to_string(threads));
    opt.num_threads = threads;
    ScanResult many;
    ASSERT_TRUE(ScanCpu(st.layout, {st.Chunk()}, qs.Batch(), opt, &many).ok());
    ExpectIdentical(one, many);
  }
}

void ExpectQueryAloneEqualsQueryInBatch(DType dtype, int dim, CpuIsa isa);

// Alone and in a batch of 64 the matrix-unit path takes different loops
// (rows through their slots vs slot-major) and, on a bf16 store whose dim is
// a multiple of 32, reads whole tiles straight from the store alone but
// copies them first in the batch: the bits must not change.
TEST(ScanCpuTest, QueryAloneEqualsQueryInBatch) {
  struct Shape {
    DType dtype;
    int dim;
  };
  // Alone, a query takes the direct kernels (AVX2 included); in the batch
  // of 64, AVX2 converts rows to a buffer first and AMX copies them.
  for (const Shape shape : {Shape{DType::kF16, 35}, Shape{DType::kBF16, 35},
                            Shape{DType::kBF16, 64}, Shape{DType::kF32, 35}}) {
    for (CpuIsa isa : IsasToTest()) {
      SCOPED_TRACE(std::string("isa=") + IsaName(isa) +
                   " dtype=" + DTypeName(shape.dtype) +
                   " D=" + std::to_string(shape.dim) + " seed=51");
      ExpectQueryAloneEqualsQueryInBatch(shape.dtype, shape.dim, isa);
    }
  }
}

void ExpectQueryAloneEqualsQueryInBatch(DType dtype, int dim, CpuIsa isa) {
  const TestStore st = MakeStore(dtype, 1, 4, dim, 150, 51);
  const TestQueries qs = MakeQueries(st.layout, 64, 52);
  ScanOptions opt;
  opt.k = 20;
  opt.isa = isa;
  opt.want_breakdown = true;
  ScanResult batch;
  ASSERT_TRUE(ScanCpu(st.layout, {st.Chunk()}, qs.Batch(), opt, &batch).ok());
  for (int q : {0, 1, 2, 3, 4, 31, 62, 63}) {
    SCOPED_TRACE("query " + std::to_string(q));
    const TestQueries single = qs.Single(q, st.layout);
    ScanResult alone;
    ASSERT_TRUE(
        ScanCpu(st.layout, {st.Chunk()}, single.Batch(), opt, &alone).ok());
    ScanResult from_batch;
    from_batch.per_query = {batch.per_query[size_t(q)]};
    ExpectIdentical(alone, from_batch);
  }
}

// Which instruction sets this run covers, and which it cannot: a path the
// CPU lacks is refused, never run.
TEST(ScanCpuTest, EveryInstructionSetThisCpuHasOrUnavailable) {
  const std::vector<CpuIsa> supported = SupportedCpuIsas();
  ASSERT_FALSE(supported.empty());
  EXPECT_EQ(supported[0], CpuIsa::kScalar);
  const TestStore st = MakeStore(DType::kBF16, 1, 2, 40, 30, 81);
  const TestQueries qs = MakeQueries(st.layout, 2, 82);
  for (CpuIsa isa :
       {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAmx}) {
    const bool has =
        std::find(supported.begin(), supported.end(), isa) != supported.end();
    ScanOptions opt;
    opt.k = 5;
    opt.isa = isa;
    ScanResult result;
    const KernelStatus status =
        ScanCpu(st.layout, {st.Chunk()}, qs.Batch(), opt, &result);
    if (has) {
      EXPECT_TRUE(status.ok()) << IsaName(isa) << ": " << status.ToString();
    } else {
      std::cout << "[  SKIPPED ] " << IsaName(isa)
                << " scan: this CPU lacks its instructions\n";
      EXPECT_EQ(status.code(), KernelCode::kUnavailable)
          << IsaName(isa) << ": " << status.ToString();
    }
  }
}

// The matrix unit runs for bf16 stores, for fp16 stores only when asked for
// by name, never for fp32 stores; without it kAmx is refused.
TEST(ScanCpuTest, MatrixUnitRunsForTheStoresItIsChosenFor) {
  const std::vector<CpuIsa> supported = SupportedCpuIsas();
  const bool has_amx = std::find(supported.begin(), supported.end(),
                                 CpuIsa::kAmx) != supported.end();
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32}) {
    SCOPED_TRACE(DTypeName(dtype));
    CpuIsa chosen = CpuIsa::kAuto;
    ASSERT_TRUE(ChooseCpuScanIsa(CpuIsa::kScalar, dtype, &chosen).ok());
    EXPECT_EQ(chosen, CpuIsa::kScalar);
    ASSERT_TRUE(ChooseCpuScanIsa(CpuIsa::kAuto, dtype, &chosen).ok());
    CpuIsa resolved = CpuIsa::kAuto;
    ASSERT_TRUE(ResolveCpuIsa(CpuIsa::kAuto, &resolved).ok());
    if (!has_amx) {
      std::cout << "[  SKIPPED ] amx scan choice: this CPU lacks AMX\n";
      EXPECT_EQ(chosen, resolved);
      EXPECT_EQ(ChooseCpuScanIsa(CpuIsa::kAmx, dtype, &chosen).code(),
                KernelCode::kUnavailable);
      continue;
    }
    EXPECT_EQ(chosen, dtype == DType::kBF16 ? CpuIsa::kAmx : CpuIsa::kAvx512);
    ASSERT_TRUE(ChooseCpuScanIsa(CpuIsa::kAmx, dtype, &chosen).ok());
    EXPECT_EQ(chosen, dtype == DType::kF32 ? CpuIsa::kAvx512 : CpuIsa::kAmx);
    ASSERT_EQ(setenv(kCpuIsaEnv, "avx512", 1), 0);
    ASSERT_TRUE(ChooseCpuScanIsa(CpuIsa::kAuto, dtype, &chosen).ok());
    EXPECT_EQ(chosen, CpuIsa::kAvx512);
    ASSERT_EQ(unsetenv(kCpuIsaEnv), 0);
  }
}

// RETRACE_CPU_ISA caps what kAuto picks: forcing the generic path gives the
// scalar scan's very bits; an unknown value is refused by name.
TEST(ScanCpuTest, EnvironmentForcesTheGenericPath) {
  const TestStore st = MakeStore(DType::kF16, 2, 3, 50, 64, 91);
  const TestQueries qs = MakeQueries(st.layout, 4, 92);
  ScanOptions opt;
  opt.k = 8;
  opt.isa = CpuIsa::kScalar;
  ScanResult scalar;
  ASSERT_TRUE(ScanCpu(st.layout, {st.Chunk()}, qs.Batch(), opt, &scalar).ok());
  opt.isa = CpuIsa::kAuto;
  ASSERT_EQ(setenv(kCpuIsaEnv, "scalar", 1), 0);
  CpuIsa chosen = CpuIsa::kAuto;
  EXPECT_TRUE(ResolveCpuIsa(CpuIsa::kAuto, &chosen).ok());
  EXPECT_EQ(chosen, CpuIsa::kScalar);
  ScanResult forced;
  EXPECT_TRUE(ScanCpu(st.layout, {st.Chunk()}, qs.Batch(), opt, &forced).ok());
  ExpectIdentical(scalar, forced);
  ASSERT_EQ(setenv(kCpuIsaEnv, "avx2", 1), 0);
  EXPECT_TRUE(ResolveCpuIsa(CpuIsa::kAuto, &chosen).ok());
  EXPECT_LE(static_cast<int>(chosen), static_cast<int>(CpuIsa::kAvx2));
  ASSERT_EQ(setenv(kCpuIsaEnv, "sse9", 1), 0);
  const KernelStatus bad =
      ScanCpu(st.layout, {st.Chunk()}, qs.Batch(), opt, &forced);
  EXPECT_EQ(bad.code(), KernelCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("RETRACE_CPU_ISA='sse9'"), std::string::npos)
      << bad.ToString();
  ASSERT_EQ(unsetenv(kCpuIsaEnv), 0);
  EXPECT_TRUE(ResolveCpuIsa(CpuIsa::kAuto, &chosen).ok());
  EXPECT_EQ(chosen, SupportedCpuIsas().back());
}

TEST(ScanCpuTest, LargestK) {
  SCOPED_TRACE("seed=61");
  const TestStore st = MakeStore(DType::kF16, 1, 1, 8, 5000, 61);
  const TestQueries qs = MakeQueries(st.layout, 2, 62);
  ScanOptions opt;
  opt.k = kMaxTopK;
  opt.num_threads = 3;
  ScanResult result;
  ASSERT_TRUE(ScanCpu(st.layout, {st.Chunk()}, qs.Batch(), opt, &result).ok());
  ExpectMatchesReference(result, BruteForce(st, qs), st.rows, opt.k, true,
                         CpuScanRelErr(opt.isa, st.layout.dtype));
}

TEST(ScanCpuTest, NaNInStoreRanksLast) {
  TestStore st = MakeStore(DType::kF32, 1, 1, 4, 10, 71);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(&st.bytes[3 * 4 * 4], &nan, 4);  // row 3, value 0
  for (CpuIsa isa : IsasToTest()) {
    for (int nq : {1, 5}) {
      SCOPED_TRACE("isa=" + std::string(IsaName(isa)) +
                   " queries=" + std::to_string(nq) + " seed=72");
      const ScanResult result = ScanWithEqualWeights(st, nq, 72, 1.0f, isa, 10);
      for (int q = 0; q < nq; ++q) {
        for (int m = 0; m < kNumMethods; ++m) {
          const RankedList& list = result.Get(q, static_cast<Method>(m));
          ASSERT_EQ(list.top.size(), 10u);
          EXPECT_EQ(list.top.back().index, 3);
          EXPECT_TRUE(std::isnan(list.top.back().score));
          EXPECT_EQ(list.bottom.back().index, 3);
        }
      }
    }
  }
}

// --- Validation ------------------------------------------------------------

class ScanValidationTest : public ::testing::Test {
 protected:
  ScanValidationTest()
      : st_(MakeStore(DType::kF16, 2, 3, 5, 10, 81)),
        qs_(MakeQueries(st_.layout, 2, 82)) {}

  KernelStatus Run(const ScanOptions& opt) {
    return Run(st_.layout, {st_.Chunk()}, qs_.Batch(), opt);
  }
  KernelStatus Run(const StoreLayout& layout,
                   const std::vector<StoreChunk>& chunks,
                   const QueryBatch& batch, const ScanOptions& opt) {
    ScanResult result;
    return ScanCpu(layout, chunks, batch, opt, &result);
  }
  static void ExpectInvalid(const KernelStatus& s, const std::string& needle) {
    EXPECT_EQ(s.code(), KernelCode::kInvalidArgument) << s.ToString();
    EXPECT_NE(s.message().find(needle), std::string::npos)
        << "message '" << s.message() << "' lacks '" << needle << "'";
  }

  TestStore st_;
  TestQueries qs_;
};

TEST_F(ScanValidationTest, KOutOfRange) {
  ScanOptions opt;
  opt.k = 0;
  ExpectInvalid(Run(opt), "k = 0");
  opt.k = kMaxTopK + 1;
  ExpectInvalid(Run(opt), "k = 4097");
  opt.k = 11;  // N = 10
  ExpectInvalid(Run(opt), "exceeds the number of samples (10)");
  opt.k = 10;
  EXPECT_TRUE(Run(opt).ok());
}

TEST_F(ScanValidationTest, QueryCountOutOfRange) {
  QueryBatch batch = qs_.Batch();
  batch.num_queries = 0;
  ExpectInvalid(Run(st_.layout, {st_.Chunk()}, batch, ScanOptions{}),
                "number of queries 0");
  TestQueries many = MakeQueries(st_.layout, 65, 83);
  ExpectInvalid(Run(st_.layout, {st_.Chunk()}, many.Batch(), ScanOptions{}),
                "number of queries 65");
}

TEST_F(ScanValidationTest, NullPointersAndSizes) {
  ScanOptions opt;
  opt.k = 3;
  QueryBatch batch = qs_.Batch();
  batch.unit = nullptr;
  ExpectInvalid(Run(st_.layout, {st_.Chunk()}, batch, opt), "pointer is null");
  batch = qs_.Batch();
  batch.retrac_weights = nullptr;
  ExpectInvalid(Run(st_.layout, {st_.Chunk()}, batch, opt),
                "weight pointer is null");
  StoreChunk chunk = st_.Chunk();
  chunk.norms = nullptr;
  ExpectInvalid(Run(st_.layout, {chunk}, qs_.Batch(), opt),
                "norms pointer is null");
  chunk = st_.Chunk();
  chunk.vectors = nullptr;
  ExpectInvalid(Run(st_.layout, {chunk}, qs_.Batch(), opt),
                "vectors pointer is null");
  chunk = st_.Chunk();
  chunk.rows = 0;
  ExpectInvalid(Run(st_.layout, {chunk}, qs_.Batch(), opt),
                "rows must be >= 1");
  ExpectInvalid(Run(st_.layout, {}, qs_.Batch(), opt), "no store chunks");
  StoreLayout layout = st_.layout;
  layout.dim = 0;
  ExpectInvalid(Run(layout, {st_.Chunk()}, qs_.Batch(), opt), "D=0");
  layout = st_.layout;
  layout.slots = -1;
  ExpectInvalid(Run(layout, {st_.Chunk()}, qs_.Batch(), opt), "S=-1");
  ExpectInvalid(
      Run(st_.layout, {st_.Chunk(0, 6), st_.Chunk(5, 5)}, qs_.Batch(), opt),
      "overlap");
  EXPECT_EQ(
      ScanCpu(st_.layout, {st_.Chunk()}, qs_.Batch(), opt, nullptr).code(),
      KernelCode::kInvalidArgument);
}

TEST_F(ScanValidationTest, NonFiniteQueryNamesQueryAndSlot) {
  ScanOptions opt;
  opt.k = 3;
  TestQueries bad = qs_;
  // Query 1, checkpoint 1, slot 2 (cs = 5), value 4.
  bad.raw[size_t((1 * 6 + 5) * 5 + 4)] =
      std::numeric_limits<float>::quiet_NaN();
  ExpectInvalid(Run(st_.layout, {st_.Chunk()}, bad.Batch(), opt),
                "query 1, checkpoint 1 slot 2: raw vector value 4 is NaN");
  bad = qs_;
  bad.unit[0] = std::numeric_limits<float>::infinity();
  ExpectInvalid(
      Run(st_.layout, {st_.Chunk()}, bad.Batch(), opt),
      "query 0, checkpoint 0 slot 0: unit vector value 0 is infinite");
  bad = qs_;
  bad.tracin_weights[6 + 1] = -std::numeric_limits<float>::infinity();
  ExpectInvalid(Run(st_.layout, {st_.Chunk()}, bad.Batch(), opt),
                "query 1, checkpoint 0 slot 1: tracin weight is infinite");
}

TEST(MergeScanResultsTest, RejectsBadInput) {
  ScanResult merged;
  EXPECT_EQ(MergeScanResults({}, 3, &merged).code(),
            KernelCode::kInvalidArgument);
  ScanResult a;
  a.per_query.resize(1);
  a.per_query[0][0].top = {{0, 1.0f, {}}, {1, 0.5f, {}}};
  a.per_query[0][1].top = {{0, 1.0f, {}}, {1, 0.5f, {}}};
  EXPECT_EQ(MergeScanResults({a}, 0, &merged).code(),
            KernelCode::kInvalidArgument);
  EXPECT_EQ(MergeScanResults({a}, 3, &merged).code(),
            KernelCode::kInvalidArgument);
  ScanResult b;
  b.per_query.resize(2);
  EXPECT_EQ(MergeScanResults({a, b}, 1, &merged).code(),
            KernelCode::kInvalidArgument);
  // The same sample from two shards is a caller error, not a silent duplicate.
  EXPECT_EQ(MergeScanResults({a, a}, 2, &merged).code(),
            KernelCode::kInvalidArgument);
  ASSERT_TRUE(MergeScanResults({a}, 2, &merged).ok());
  EXPECT_EQ(merged.per_query[0][0].top[0].index, 0);
}

TEST(ScanCudaStubTest, UnavailableWithoutDevice) {
  if (CudaDeviceAvailable()) GTEST_SKIP() << "a device is present";
  EXPECT_EQ(CudaSelfTest().code(), KernelCode::kUnavailable);
  size_t bytes = 0;
  EXPECT_EQ(CudaScanScratchBytes(StoreLayout{DType::kF16, 1, 1, 8}, {}, 1,
                                 ScanOptions{}, &bytes)
                .code(),
            BuiltWithCuda() ? KernelCode::kInvalidArgument
                            : KernelCode::kUnavailable);
}

}  // namespace
}  // namespace retrace::kernels
