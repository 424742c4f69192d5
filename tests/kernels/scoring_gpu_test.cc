// CUDA scoring scan against the CPU scan (and the brute-force reference) on
// the same data. Labelled `gpu`; every test skips without a device.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include "kernels/device.h"
#include "kernels/scoring.h"
#include "tests/kernels/scoring_test_util.h"

#ifdef RETRACE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace retrace::kernels {
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
using testing::ExpectIdentical;
using testing::ExpectMatchesReference;
using testing::kF32MaxRelErr;
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

class ScanCudaVsCpuTest : public ::testing::TestWithParam<Case> {};

TEST_P(ScanCudaVsCpuTest, MatchesReferenceAndCpu) {
  RETRACE_SKIP_WITHOUT_DEVICE();
  const Case& p = GetParam();
  const uint64_t seed =
      5000 + uint64_t(p.d) * 3 + uint64_t(p.rows) + uint64_t(p.queries);
  SCOPED_TRACE(std::string("dtype=") + DTypeName(p.dtype) +
               " C=" + std::to_string(p.c) + " S=" + std::to_string(p.s) +
               " D=" + std::to_string(p.d) + " N=" + std::to_string(p.rows) +
               " Q=" + std::to_string(p.queries) + " k=" + std::to_string(p.k) +
               " seed=" + std::to_string(seed));
  const TestStore st = MakeStore(p.dtype, p.c, p.s, p.d, p.rows, seed);
  const TestQueries qs = MakeQueries(st.layout, p.queries, seed + 1);
  const DeviceData dev(st, qs);
  ScanOptions opt;
  opt.k = p.k == 0 ? int32_t(p.rows) : p.k;
  opt.want_breakdown = true;

  ScanResult gpu;
  KernelStatus s =
      RunCuda(st.layout, {dev.Chunk(0, p.rows)}, dev.Batch(), opt, &gpu);
  ASSERT_TRUE(s.ok()) << s.ToString();
  const Reference ref = BruteForce(st, qs);
  ExpectMatchesReference(gpu, ref, p.rows, opt.k, true);

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
          const double tol =
              2 * kF32MaxRelErr * ref.Magnitude(gl[i].index, q, m);
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

INSTANTIATE_TEST_SUITE_P(
    Shapes, ScanCudaVsCpuTest,
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
                      Case{DType::kF16, 1, 1, 16, 6000, 2, 4096}));

TEST(ScanCudaTest, ChunkSplitsBatchingAndRepeatsGiveIdenticalResults) {
  RETRACE_SKIP_WITHOUT_DEVICE();
  SCOPED_TRACE("seed=91");
  const TestStore st = MakeStore(DType::kF16, 2, 3, 64, 1500, 91);
  const TestQueries qs = MakeQueries(st.layout, 40, 92);
  const DeviceData dev(st, qs);
  ScanOptions opt;
  opt.k = 50;
  opt.want_breakdown = true;
  ScanResult whole, again, split;
  ASSERT_TRUE(
      RunCuda(st.layout, {dev.Chunk(0, 1500)}, dev.Batch(), opt, &whole).ok());
  ASSERT_TRUE(
      RunCuda(st.layout, {dev.Chunk(0, 1500)}, dev.Batch(), opt, &again).ok());
  ExpectIdentical(whole, again);
  // Out of order, with a single-row chunk.
  ASSERT_TRUE(RunCuda(st.layout,
                      {dev.Chunk(900, 600), dev.Chunk(0, 1), dev.Chunk(1, 899)},
                      dev.Batch(), opt, &split)
                  .ok());
  ExpectIdentical(whole, split);
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
  }
}

TEST(ScanCudaTest, UnalignedChunksUseScalarLoads) {
  RETRACE_SKIP_WITHOUT_DEVICE();
  SCOPED_TRACE("seed=95");
  // D = 12 fp16: rows are 24-byte multiples, so odd chunk starts are not
  // 16-byte aligned.
  const TestStore st = MakeStore(DType::kF16, 1, 3, 12, 333, 95);
  const TestQueries qs = MakeQueries(st.layout, 3, 96);
  const DeviceData dev(st, qs);
  ScanOptions opt;
  opt.k = 20;
  ScanResult whole, split;
  ASSERT_TRUE(
      RunCuda(st.layout, {dev.Chunk(0, 333)}, dev.Batch(), opt, &whole).ok());
  ASSERT_TRUE(RunCuda(st.layout, {dev.Chunk(0, 101), dev.Chunk(101, 232)},
                      dev.Batch(), opt, &split)
                  .ok());
  ExpectMatchesReference(whole, BruteForce(st, qs), 333, opt.k, true);
  ExpectMatchesReference(split, BruteForce(st, qs), 333, opt.k, true);
}

TEST(ScanCudaTest, TiesGoToTheLowestIndices) {
  RETRACE_SKIP_WITHOUT_DEVICE();
  TestStore one = MakeStore(DType::kBF16, 2, 2, 16, 1, 97);
  TestStore st = one;
  st.rows = 3000;
  st.bytes.clear();
  st.norms.clear();
  for (int64_t n = 0; n < st.rows; ++n) {
    st.bytes.insert(st.bytes.end(), one.bytes.begin(), one.bytes.end());
    st.norms.insert(st.norms.end(), one.norms.begin(), one.norms.end());
  }
  const TestQueries qs = MakeQueries(st.layout, 2, 98);
  const DeviceData dev(st, qs);
  ScanOptions opt;
  opt.k = 300;
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
      }
    }
  }
}

TEST(ScanCudaTest, RejectsBadArguments) {
  RETRACE_SKIP_WITHOUT_DEVICE();
  const TestStore st = MakeStore(DType::kF16, 2, 3, 8, 20, 99);
  TestQueries qs = MakeQueries(st.layout, 2, 100);
  qs.unit[size_t((1 * 6 + 4) * 8 + 3)] = std::numeric_limits<float>::infinity();
  const DeviceData dev(st, qs);
  ScanOptions opt;
  opt.k = 5;
  ScanResult result;
  KernelStatus s =
      RunCuda(st.layout, {dev.Chunk(0, 20)}, dev.Batch(), opt, &result);
  EXPECT_EQ(s.code(), KernelCode::kInvalidArgument);
  EXPECT_NE(s.message().find("query 1, checkpoint 1 slot 1: unit vector"),
            std::string::npos)
      << s.ToString();
  opt.k = 21;
  EXPECT_EQ(
      RunCuda(st.layout, {dev.Chunk(0, 20)}, dev.Batch(), opt, &result).code(),
      KernelCode::kInvalidArgument);
  opt.k = 5;
  size_t bytes = 0;
  ASSERT_TRUE(
      CudaScanScratchBytes(st.layout, {dev.Chunk(0, 20)}, 2, opt, &bytes).ok());
  DeviceBuffer scratch(bytes);
  EXPECT_EQ(ScanCuda(st.layout, {dev.Chunk(0, 20)}, dev.Batch(), opt,
                     scratch.get(), bytes - 1, nullptr, &result)
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
  ScanOptions opt;
  opt.k = 4;
  ScanResult result;
  KernelStatus s = RunCuda(layout, {chunk}, batch, opt, &result);
  ASSERT_TRUE(s.ok()) << s.ToString();
  for (int m = 0; m < kNumMethods; ++m) {
    const RankedList& list = result.Get(0, static_cast<Method>(m));
    EXPECT_EQ(list.top[0].index, planted[2]);
    EXPECT_EQ(list.top[1].index, planted[1]);
    EXPECT_EQ(list.top[2].index, planted[0]);
    EXPECT_EQ(list.top[3].index, 0);  // the tie among the rest: lowest index
    EXPECT_FLOAT_EQ(list.top[0].score, 3.0f * 2048.0f);
    EXPECT_EQ(list.bottom[0].index, 0);
  }
}

#endif  // RETRACE_HAVE_CUDA

}  // namespace
}  // namespace retrace::kernels
