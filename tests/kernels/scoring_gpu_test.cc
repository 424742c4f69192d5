// CUDA scoring scan against the CPU scan (and the brute-force reference) on
// the same data, on both arithmetic paths (fp32 and tensor cores). Labelled
// `gpu`; every test skips without a device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/device.h"
#include "kernels/scoring.h"
#include "tests/kernels/scoring_test_util.h"

#ifdef RETRACE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace retrace::kernels {

// Test names and failure messages spell the path out.
void PrintTo(CudaScanPath path, std::ostream* os) {
  *os << CudaScanPathName(path);
}

namespace {

#define RETRACE_SKIP_WITHOUT_DEVICE()         \
  if (!CudaDeviceAvailable()) {               \
    GTEST_SKIP() << CudaAvailabilityReason(); \
  }

TEST(ScanCudaTest, SelfTestPasses) {
  RETRACE_SKIP_WITHOUT_DEVICE();
  KernelStatus s = CudaSelfTest();
  EXPECT_TRUE(s.ok()) << s.ToString();
}

#ifdef RETRACE_HAVE_CUDA

using testing::BruteForce;
using testing::CpuScanRelErr;
using testing::ExpectIdentical;
using testing::ExpectMatchesReference;
using testing::kF32MaxRelErr;
using testing::kTensorCoreMaxRelErr;
using testing::MakeQueries;
using testing::MakeStore;
using testing::Reference;
using testing::TestQueries;
using testing::TestStore;

// Owns one device allocation.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) {
    EXPECT_EQ(cudaMalloc(&ptr_, std::max<size_t>(bytes, 1)), cudaSuccess);
  }
  DeviceBuffer(const void* src, size_t bytes) : DeviceBuffer(bytes) {
    EXPECT_EQ(cudaMemcpy(ptr_, src, bytes, cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(ptr_); }
  void* get() const { return ptr_; }
  template <typename T>
  const T* as() const {
    return static_cast<const T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
};

// A test store and queries copied to the device.
struct DeviceData {
  DeviceData(const TestStore& st, const TestQueries& qs)
      : vectors(st.bytes.data(), st.bytes.size()),
        norms(st.norms.data(), st.norms.size() * sizeof(float)),
        raw(qs.raw.data(), qs.raw.size() * sizeof(float)),
        unit(qs.unit.data(), qs.unit.size() * sizeof(float)),
        tracin(qs.tracin_weights.data(),
               qs.tracin_weights.size() * sizeof(float)),
        retrac(qs.retrac_weights.data(),
               qs.retrac_weights.size() * sizeof(float)),
        layout(st.layout),
        num_queries(qs.num_queries) {}

  StoreChunk Chunk(int64_t first_row, int64_t count) const {
    StoreChunk c;
    c.vectors = static_cast<const uint8_t*>(vectors.get()) +
                first_row * layout.RowValues() * DTypeSize(layout.dtype);
    c.norms = norms.as<float>() + first_row * layout.SlotPairs();
    c.rows = count;
    c.first_index = first_row;
    return c;
  }
  QueryBatch Batch() const {
    return QueryBatch{num_queries, raw.as<float>(), unit.as<float>(),
                      tracin.as<float>(), retrac.as<float>()};
  }

  DeviceBuffer vectors, norms, raw, unit, tracin, retrac;
  StoreLayout layout;
  int32_t num_queries;
};

KernelStatus RunCuda(const StoreLayout& layout,
                     const std::vector<StoreChunk>& chunks,
                     const QueryBatch& batch, const ScanOptions& opt,
                     ScanResult* result) {
  size_t bytes = 0;
  KernelStatus s =
      CudaScanScratchBytes(layout, chunks, batch.num_queries, opt, &bytes);
  if (!s.ok()) return s;
  DeviceBuffer scratch(bytes);
  cudaStream_t stream;
  EXPECT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  s = ScanCuda(layout, chunks, batch, opt, scratch.get(), bytes, stream,
               result);
  cudaStreamDestroy(stream);
  return s;
}

// The paths a store of `dtype` can take.
std::vector<CudaScanPath> PathsFor(DType dtype) {
  if (dtype == DType::kF32) return {CudaScanPath::kFp32};
  return {CudaScanPath::kFp32, CudaScanPath::kTensorCore};
}

double RelErrFor(CudaScanPath path) {
  return path == CudaScanPath::kTensorCore ? kTensorCoreMaxRelErr
                                           : kF32MaxRelErr;
}

struct Case {
  DType dtype;
  int c, s, d;
  int64_t rows;
  int32_t queries;
  int32_t k;  // 0: k = rows
};

void PrintTo(const Case& p, std::ostream* os) {
  *os << DTypeName(p.dtype) << " C=" << p.c << " S=" << p.s << " D=" << p.d
      << " N=" << p.rows << " Q=" << p.queries << " k=" << p.k;
}

class ScanCudaVsCpuTest
    : public ::testing::TestWithParam<std::tuple<Case, CudaScanPath>> {};

TEST_P(ScanCudaVsCpuTest, MatchesReferenceAndCpu) {
  RETRACE_SKIP_WITHOUT_DEVICE();
  const Case& p = std::get<0>(GetParam());
  const CudaScanPath path = std::get<1>(GetParam());
  const uint64_t seed =
      5000 + uint64_t(p.d) * 3 + uint64_t(p.rows) + uint64_t(p.queries);
  SCOPED_TRACE(std::string("path=") + CudaScanPathName(path) +
               " dtype=" + DTypeName(p.dtype) + " C=" + std::to_string(p.c) +
               " S=" + std::to_string(p.s) + " D=" + std::to_string(p.d) +
               " N=" + std::to_string(p.rows) +
               " Q=" + std::to_string(p.queries) + " k=" + std::to_string(p.k) +
               " seed=" + std::to_string(seed));
  const TestStore st = MakeStore(p.dtype, p.c, p.s, p.d, p.rows, seed);
  const TestQueries qs = MakeQueries(st.layout, p.queries, seed + 1);
  const DeviceData dev(st, qs);
  ScanOptions opt;
  opt.k = p.k == 0 ? int32_t(p.rows) : p.k;
  opt.want_breakdown = true;
  opt.cuda_path = path;
  const double rel_err = RelErrFor(path);

  ScanResult gpu;
  KernelStatus s =
      RunCuda(st.layout, {dev.Chunk(0, p.rows)}, dev.Batch(), opt, &gpu);
  if (path == CudaScanPath::kTensorCore && p.dtype == DType::kF32) {
    EXPECT_EQ(s.code(), KernelCode::kInvalidArgument) << s.ToString();
    return;
  }
  ASSERT_TRUE(s.ok()) << s.ToString();
  const Reference ref = BruteForce(st, qs);
  ExpectMatchesReference(gpu, ref, p.rows, opt.k, true, rel_err);

  ScanResult cpu;
  ASSERT_TRUE(ScanCpu(st.layout, {st.Chunk()}, qs.Batch(), opt, &cpu).ok());
  const int64_t cs_count = st.layout.SlotPairs();
  for (int q = 0; q < p.queries; ++q) {
    for (int m = 0; m < kNumMethods; ++m) {
      const RankedList& g = gpu.Get(q, static_cast<Method>(m));
      const RankedList& c = cpu.Get(q, static_cast<Method>(m));
      for (int bottom = 0; bottom < 2; ++bottom) {
        const auto& gl = bottom ? g.bottom : g.top;
        const auto& cl = bottom ? c.bottom : c.top;
        ASSERT_EQ(gl.size(), cl.size());
        for (size_t i = 0; i < gl.size(); ++i) {
          const double tol = (CpuScanRelErr(CpuIsa::kAuto, p.dtype) + rel_err) *
                             ref.Magnitude(gl[i].index, q, m);
          EXPECT_NEAR(gl[i].score, cl[i].score, tol) << "rank " << i;
          ASSERT_EQ(gl[i].breakdown.size(), size_t(cs_count));
          double sum = 0;
          for (float x : gl[i].breakdown) sum += x;
          EXPECT_NEAR(sum, gl[i].score, tol) << "breakdown sum, rank " << i;
          if (gl[i].index == cl[i].index) {
            for (int64_t cs = 0; cs < cs_count; ++cs) {
              EXPECT_NEAR(gl[i].breakdown[size_t(cs)],
                          cl[i].breakdown[size_t(cs)], tol);
            }
          }
        }
      }
    }
  }
}

// Every tensor-core configuration (Q -> 1, 2, 4, 8 column fragments, full
// and partial), D below, at and between MMA steps and 64-value pieces, N
// around the 64- and 128-row tiles, k = 1, k = N and k = 4096.
INSTANTIATE_TEST_SUITE_P(
    Shapes, ScanCudaVsCpuTest,
    ::testing::Combine(
        ::testing::Values(Case{DType::kF16, 1, 1, 8, 1, 1, 1},
                          Case{DType::kF16, 2, 6, 1, 37, 1, 5},
                          Case{DType::kBF16, 1, 2, 3, 301, 2, 0},
                          Case{DType::kF32, 3, 2, 17, 257, 4, 17},
                          Case{DType::kF16, 1, 11, 100, 129, 5, 1},
                          Case{DType::kBF16, 2, 6, 1000, 45, 3, 45},
                          Case{DType::kF32, 1, 1, 4096, 33, 7, 10},
                          Case{DType::kF16, 1, 2, 4096, 19, 9, 19},
                          Case{DType::kF16, 2, 6, 64, 1000, 16, 100},
                          Case{DType::kBF16, 2, 3, 24, 700, 33, 7},
                          Case{DType::kF16, 2, 2, 24, 70, 64, 0},
                          Case{DType::kF32, 2, 1, 40, 65, 64, 64},
                          Case{DType::kF16, 1, 1, 16, 6000, 2, 4096},
                          Case{DType::kBF16, 1, 3, 16, 128, 8, 128},
                          Case{DType::kF16, 2, 1, 17, 129, 17, 3},
                          Case{DType::kBF16, 1, 2, 64, 64, 32, 64},
                          Case{DType::kF16, 1, 1, 65, 257, 48, 9},
                          Case{DType::kBF16, 2, 2, 128, 513, 63, 1},
                          Case{DType::kF16, 1, 2, 512, 300, 64, 300}),
        ::testing::Values(CudaScanPath::kFp32, CudaScanPath::kTensorCore)));

TEST(ScanCudaTest, ChunkSplitsBatchingAndRepeatsGiveIdenticalResults) {
  RETRACE_SKIP_WITHOUT_DEVICE();
  const TestStore st = MakeStore(DType::kF16, 2, 3, 64, 1500, 91);
  const TestQueries qs = MakeQueries(st.layout, 40, 92);
  const DeviceData dev(st, qs);
  for (CudaScanPath path : PathsFor(DType::kF16)) {
    SCOPED_TRACE(std::string("path=") + CudaScanPathName(path) + " seed=91");
    ScanOptions opt;
    opt.k = 50;
    opt.want_breakdown = true;
    opt.cuda_path = path;
    ScanResult whole, again, split;
    ASSERT_TRUE(
        RunCuda(st.layout, {dev.Chunk(0, 1500)}, dev.Batch(), opt, &whole)
            .ok());
    ASSERT_TRUE(
        RunCuda(st.layout, {dev.Chunk(0, 1500)}, dev.Batch(), opt, &again)
            .ok());
    ExpectIdentical(whole, again);
    // Out of order, with a single-row chunk and chunks that start inside a
    // 16-row fragment of the whole store's tiling.
    ASSERT_TRUE(
        RunCuda(st.layout,
                {dev.Chunk(900, 600), dev.Chunk(0, 1), dev.Chunk(1, 899)},
                dev.Batch(), opt, &split)
            .ok());
    ExpectIdentical(whole, split);
    // A query alone, and in a batch of another size (another column-fragment
    // configuration), at another place in that batch.
    for (int q : {0, 1, 17, 39}) {
      SCOPED_TRACE("query " + std::to_string(q));
      const TestQueries single = qs.Single(q, st.layout);
      const DeviceData dev1(st, single);
      ScanResult alone;
      ASSERT_TRUE(
          RunCuda(st.layout, {dev1.Chunk(0, 1500)}, dev1.Batch(), opt, &alone)
              .ok());
      ScanResult from_batch;
      from_batch.per_query = {whole.per_query[size_t(q)]};
      ExpectIdentical(alone, from_batch);
      TestQueries pair = qs.Single(39 - q, st.layout);
      const TestQueries mine = qs.Single(q, st.layout);
      pair.num_queries = 2;
      pair.raw.insert(pair.raw.end(), mine.raw.begin(), mine.raw.end());
      pair.unit.insert(pair.unit.end(), mine.unit.begin(), mine.unit.end());
      pair.tracin_weights.insert(pair.tracin_weights.end(),
                                 mine.tracin_weights.begin(),
                                 mine.tracin_weights.end());
      pair.retrac_weights.insert(pair.retrac_weights.end(),
                                 mine.retrac_weights.begin(),
                                 mine.retrac_weights.end());
      const DeviceData dev2(st, pair);
      ScanResult in_pair;
      ASSERT_TRUE(
          RunCuda(st.layout, {dev2.Chunk(0, 1500)}, dev2.Batch(), opt, &in_pair)
              .ok());
      ScanResult second;
      second.per_query = {in_pair.per_query[1]};
      ExpectIdentical(alone, second);
    }
  }
}

TEST(ScanCudaTest, UnalignedChunksUseScalarLoads) {
  RETRACE_SKIP_WITHOUT_DEVICE();
  // D = 12 fp16: rows are 24-byte multiples, so odd chunk starts are not
  // 16-byte aligned.
  const TestStore st = MakeStore(DType::kF16, 1, 3, 12, 333, 95);
  const TestQueries qs = MakeQueries(st.layout, 3, 96);
  const DeviceData dev(st, qs);
  for (CudaScanPath path : PathsFor(DType::kF16)) {
    SCOPED_TRACE(std::string("path=") + CudaScanPathName(path) + " seed=95");
    ScanOptions opt;
    opt.k = 20;
    opt.cuda_path = path;
    ScanResult whole, split;
    ASSERT_TRUE(
        RunCuda(st.layout, {dev.Chunk(0, 333)}, dev.Batch(), opt, &whole).ok());
    ASSERT_TRUE(RunCuda(st.layout, {dev.Chunk(0, 101), dev.Chunk(101, 232)},
                        dev.Batch(), opt, &split)
                    .ok());
    const Reference ref = BruteForce(st, qs);
    ExpectMatchesReference(whole, ref, 333, opt.k, true, RelErrFor(path));
    ExpectMatchesReference(split, ref, 333, opt.k, true, RelErrFor(path));
    ExpectIdentical(whole, split);
  }
}

// `rows` copies of one random row.
TestStore ConstantStore(DType dtype, int c, int s, int d, int64_t rows,
                        uint64_t seed) {
  TestStore one = MakeStore(dtype, c, s, d, 1, seed);
  TestStore st = one;
  st.rows = rows;
  st.bytes.clear();
  st.norms.clear();
  for (int64_t n = 0; n < rows; ++n) {
    st.bytes.insert(st.bytes.end(), one.bytes.begin(), one.bytes.end());
    st.norms.insert(st.norms.end(), one.norms.begin(), one.norms.end());
  }
  return st;
}

TEST(ScanCudaTest, TiesGoToTheLowestIndices) {
  RETRACE_SKIP_WITHOUT_DEVICE();
  const TestStore st = ConstantStore(DType::kBF16, 2, 2, 16, 3000, 97);
  const TestQueries qs = MakeQueries(st.layout, 2, 98);
  const DeviceData dev(st, qs);
  for (CudaScanPath path : PathsFor(DType::kBF16)) {
    SCOPED_TRACE(std::string("path=") + CudaScanPathName(path) + " seed=97");
    ScanOptions opt;
    opt.k = 300;
    opt.cuda_path = path;
    ScanResult result;
    ASSERT_TRUE(RunCuda(st.layout, {dev.Chunk(1000, 2000), dev.Chunk(0, 1000)},
                        dev.Batch(), opt, &result)
                    .ok());
    for (int q = 0; q < 2; ++q) {
      for (int m = 0; m < kNumMethods; ++m) {
        const RankedList& list = result.Get(q, static_cast<Method>(m));
        for (int i = 0; i < opt.k; ++i) {
          ASSERT_EQ(list.top[size_t(i)].index, i);
          ASSERT_EQ(list.bottom[size_t(i)].index, i);
          ASSERT_EQ(FloatBits(list.top[size_t(i)].score),
                    FloatBits(list.top[0].score));
        }
      }
    }
  }
}

// Ties spread over many selection slices (kernels/scan_plan.h): the k
// lowest indices must win, so each slice has to know the ties of the slices
// before it. Half of the rows score higher and are all taken first.
TEST(ScanCudaTest, TiesAcrossSelectionSlices) {
  RETRACE_SKIP_WITHOUT_DEVICE();
  const int64_t rows = 100000;  // 7 slices of at most 16384 positions
  TestStore st = ConstantStore(DType::kF16, 1, 1, 16, rows, 101);
  // Rows 50000 + 3j (j < 1000) are doubled: they are the top 1000 of every
  // positive-weight column, the bottom 1000 of every negative one.
  const size_t row_bytes = 16 * 2;
  for (int64_t j = 0; j < 1000; ++j) {
    const int64_t n = 50000 + 3 * j;
    for (int d = 0; d < 16; ++d) {
      uint16_t h;
      std::memcpy(&h, &st.bytes[size_t(n) * row_bytes + size_t(d) * 2], 2);
      const uint16_t twice = FloatToHalf(2.0f * HalfToFloat(h));
      std::memcpy(&st.bytes[size_t(n) * row_bytes + size_t(d) * 2], &twice, 2);
    }
  }
  TestQueries qs = MakeQueries(st.layout, 1, 102);
  qs.tracin_weights[0] = 1.0f;
  qs.retrac_weights[0] = 1.0f;
  const DeviceData dev(st, qs);
  const Reference ref = BruteForce(st, qs);
  for (CudaScanPath path : PathsFor(DType::kF16)) {
    for (int32_t k : {1, 999, 1000, 1001, 4096}) {
      SCOPED_TRACE(std::string("path=") + CudaScanPathName(path) +
                   " k=" + std::to_string(k) + " seed=101");
      ScanOptions opt;
      opt.k = k;
      opt.cuda_path = path;
      ScanResult result;
      ASSERT_TRUE(RunCuda(st.layout,
                          {dev.Chunk(70000, 30000), dev.Chunk(0, 70000)},
                          dev.Batch(), opt, &result)
                      .ok());
      for (int m = 0; m < kNumMethods; ++m) {
        SCOPED_TRACE("method " + std::to_string(m));
        const bool doubled_on_top = ref.Score(50000, 0, m) > ref.Score(0, 0, m);
        const RankedList& list = result.Get(0, static_cast<Method>(m));
        const std::vector<ScoredSample>& high =
            doubled_on_top ? list.top : list.bottom;
        const std::vector<ScoredSample>& low =
            doubled_on_top ? list.bottom : list.top;
        ASSERT_EQ(high.size(), size_t(k));
        ASSERT_EQ(low.size(), size_t(k));
        // The doubled rows first, then the plain ones; each group a tie
        // taken in index order (k <= 4096, so no plain row reaches 50000).
        for (int i = 0; i < k; ++i) {
          const int64_t want_high = i < 1000 ? 50000 + 3 * i : i - 1000;
          ASSERT_EQ(high[size_t(i)].index, want_high) << "rank " << i;
          ASSERT_EQ(low[size_t(i)].index, i) << "rank " << i;
        }
      }
    }
  }
}

TEST(ScanCudaTest, NaNRowsRankLast) {
  RETRACE_SKIP_WITHOUT_DEVICE();
  TestStore st = MakeStore(DType::kF16, 1, 2, 32, 50, 103);
  const uint16_t nan = 0x7e00;
  for (int64_t n : {7, 3}) {  // row n, slot 1, value 5
    std::memcpy(&st.bytes[size_t(((n * 2 + 1) * 32 + 5) * 2)], &nan, 2);
  }
  TestQueries qs = MakeQueries(st.layout, 2, 104);
  for (float& w : qs.tracin_weights) w = 1.0f;
  for (float& w : qs.retrac_weights) w = 1.0f;
  const DeviceData dev(st, qs);
  for (CudaScanPath path : PathsFor(DType::kF16)) {
    SCOPED_TRACE(std::string("path=") + CudaScanPathName(path) + " seed=103");
    ScanOptions opt;
    opt.k = 50;
    opt.cuda_path = path;
    ScanResult result;
    ASSERT_TRUE(RunCuda(st.layout, {dev.Chunk(0, 25), dev.Chunk(25, 25)},
                        dev.Batch(), opt, &result)
                    .ok());
    for (int q = 0; q < 2; ++q) {
      for (int m = 0; m < kNumMethods; ++m) {
        const RankedList& list = result.Get(q, static_cast<Method>(m));
        for (const auto* l : {&list.top, &list.bottom}) {
          ASSERT_EQ(l->size(), 50u);
          EXPECT_EQ((*l)[48].index, 3);
          EXPECT_EQ((*l)[49].index, 7);
          EXPECT_TRUE(std::isnan((*l)[48].score));
          EXPECT_TRUE(std::isnan((*l)[49].score));
          for (int i = 0; i < 48; ++i)
            EXPECT_FALSE(std::isnan((*l)[size_t(i)].score));
        }
      }
    }
  }
}

// Many selection slices, several columns, k from 1 to the largest.
TEST(ScanCudaTest, MultiBlockSelectionMatchesReference) {
  RETRACE_SKIP_WITHOUT_DEVICE();
  const TestStore st = MakeStore(DType::kBF16, 1, 2, 24, 70001, 105);
  const TestQueries qs = MakeQueries(st.layout, 3, 106);
  const DeviceData dev(st, qs);
  const Reference ref = BruteForce(st, qs);
  for (CudaScanPath path : PathsFor(DType::kBF16)) {
    for (int32_t k : {1, 2, 777, 4096}) {
      SCOPED_TRACE(std::string("path=") + CudaScanPathName(path) +
                   " k=" + std::to_string(k) + " seed=105");
      ScanOptions opt;
      opt.k = k;
      opt.cuda_path = path;
      ScanResult result;
      ASSERT_TRUE(
          RunCuda(st.layout, {dev.Chunk(0, 70001)}, dev.Batch(), opt, &result)
              .ok());
      ExpectMatchesReference(result, ref, st.rows, k, true, RelErrFor(path));
    }
  }
}

TEST(ScanCudaTest, RejectsBadArguments) {
  RETRACE_SKIP_WITHOUT_DEVICE();
  const TestStore st = MakeStore(DType::kF16, 2, 3, 8, 20, 99);
  TestQueries qs = MakeQueries(st.layout, 2, 100);
  qs.unit[size_t((1 * 6 + 4) * 8 + 3)] = std::numeric_limits<float>::infinity();
  const DeviceData dev(st, qs);
  for (CudaScanPath path : PathsFor(DType::kF16)) {
    SCOPED_TRACE(std::string("path=") + CudaScanPathName(path));
    ScanOptions opt;
    opt.k = 5;
    opt.cuda_path = path;
    ScanResult result;
    KernelStatus s =
        RunCuda(st.layout, {dev.Chunk(0, 20)}, dev.Batch(), opt, &result);
    EXPECT_EQ(s.code(), KernelCode::kInvalidArgument);
    EXPECT_NE(s.message().find("query 1, checkpoint 1 slot 1: unit vector"),
              std::string::npos)
        << s.ToString();
    opt.k = 21;
    EXPECT_EQ(RunCuda(st.layout, {dev.Chunk(0, 20)}, dev.Batch(), opt, &result)
                  .code(),
              KernelCode::kInvalidArgument);
    opt.k = 5;
    size_t bytes = 0;
    ASSERT_TRUE(
        CudaScanScratchBytes(st.layout, {dev.Chunk(0, 20)}, 2, opt, &bytes)
            .ok());
    DeviceBuffer scratch(bytes);
    EXPECT_EQ(ScanCuda(st.layout, {dev.Chunk(0, 20)}, dev.Batch(), opt,
                       scratch.get(), bytes - 1, nullptr, &result)
                  .code(),
              KernelCode::kInvalidArgument);
  }
  // Tensor cores need a 16-bit store.
  const TestStore f32 = MakeStore(DType::kF32, 1, 1, 32, 20, 107);
  const TestQueries q32 = MakeQueries(f32.layout, 1, 108);
  const DeviceData dev32(f32, q32);
  ScanOptions opt;
  opt.k = 3;
  opt.cuda_path = CudaScanPath::kTensorCore;
  ScanResult result;
  EXPECT_EQ(
      RunCuda(f32.layout, {dev32.Chunk(0, 20)}, dev32.Batch(), opt, &result)
          .code(),
      KernelCode::kInvalidArgument);
}

// A chunk past 2^31 values: offsets must be 64-bit. All rows hold the same
// value except a few planted ones at the end, which must top the ranking.
TEST(ScanCudaTest, SixtyFourBitOffsets) {
  RETRACE_SKIP_WITHOUT_DEVICE();
  const StoreLayout layout{DType::kF16, 1, 2, 1024};
  const int64_t rows = 1100000;  // 2.25e9 values, 4.5 GB
  const size_t bytes = size_t(rows * layout.RowValues() * 2);
  size_t free_bytes = 0, total_bytes = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total_bytes), cudaSuccess);
  if (free_bytes < bytes + (size_t(1) << 30))
    GTEST_SKIP() << "not enough device memory";
  DeviceBuffer vectors(bytes);
  ASSERT_EQ(cudaMemset(vectors.get(), 0x2c, bytes),
            cudaSuccess);  // fp16 0x2c2c ~ 0.06
  std::vector<float> norms(size_t(rows * 2), 1.0f);
  DeviceBuffer d_norms(norms.data(), norms.size() * sizeof(float));
  const std::vector<int64_t> planted = {rows - 1, rows - 7, rows - 1000};
  for (size_t i = 0; i < planted.size(); ++i) {
    std::vector<uint16_t> row(size_t(layout.RowValues()),
                              FloatToHalf(1.0f + float(i)));
    ASSERT_EQ(cudaMemcpy(static_cast<uint8_t*>(vectors.get()) +
                             planted[i] * layout.RowValues() * 2,
                         row.data(), row.size() * 2, cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  TestQueries qs;
  qs.num_queries = 1;
  qs.raw.assign(size_t(layout.RowValues()), 1.0f);
  qs.unit.assign(size_t(layout.RowValues()), 1.0f);
  qs.tracin_weights.assign(2, 1.0f);
  qs.retrac_weights.assign(2, 1.0f);
  DeviceBuffer raw(qs.raw.data(), qs.raw.size() * 4),
      unit(qs.unit.data(), qs.unit.size() * 4), tr(qs.tracin_weights.data(), 8),
      rt(qs.retrac_weights.data(), 8);
  const QueryBatch batch{1, raw.as<float>(), unit.as<float>(), tr.as<float>(),
                         rt.as<float>()};
  StoreChunk chunk{vectors.get(), d_norms.as<float>(), rows, 0};
  for (CudaScanPath path : PathsFor(DType::kF16)) {
    SCOPED_TRACE(std::string("path=") + CudaScanPathName(path));
    ScanOptions opt;
    opt.k = 4;
    opt.cuda_path = path;
    ScanResult result;
    KernelStatus s = RunCuda(layout, {chunk}, batch, opt, &result);
    ASSERT_TRUE(s.ok()) << s.ToString();
    for (int m = 0; m < kNumMethods; ++m) {
      const RankedList& list = result.Get(0, static_cast<Method>(m));
      EXPECT_EQ(list.top[0].index, planted[2]);
      EXPECT_EQ(list.top[1].index, planted[1]);
      EXPECT_EQ(list.top[2].index, planted[0]);
      EXPECT_EQ(list.top[3].index, 0);  // the tie among the rest: lowest index
      // Exact on both paths: small integers times powers of two.
      EXPECT_FLOAT_EQ(list.top[0].score, 3.0f * 2048.0f);
      EXPECT_EQ(list.bottom[0].index, 0);
    }
  }
}

#endif  // RETRACE_HAVE_CUDA

}  // namespace
}  // namespace retrace::kernels
