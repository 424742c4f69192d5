// CUDA projection against the CPU backend on the same data. Both accumulate
// the same integers, so accumulators and outputs must match bit for bit.
// Skips (with the reason) where no device can be used.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/device.h"
#include "kernels/projection.h"
#include "tests/kernels/projection_test_util.h"

#ifdef RETRACE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace retrace::kernels {
namespace {

#ifdef RETRACE_HAVE_CUDA

#define SKIP_WITHOUT_DEVICE()                   \
  do {                                          \
    if (!CudaDeviceAvailable()) {               \
      GTEST_SKIP() << CudaAvailabilityReason(); \
    }                                           \
  } while (0)

#define ASSERT_CUDA(call) ASSERT_EQ((call), cudaSuccess) << #call

// Device buffer freed on scope exit.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) {
    if (cudaMalloc(&ptr_, std::max<size_t>(n, 1) * sizeof(T)) != cudaSuccess) {
      ptr_ = nullptr;
    }
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return ptr_; }
  bool Upload(const std::vector<T>& v) {
    return cudaMemcpy(ptr_, v.data(), v.size() * sizeof(T),
                      cudaMemcpyHostToDevice) == cudaSuccess;
  }
  std::vector<T> Download() const {
    std::vector<T> v(n_);
    if (cudaMemcpy(v.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost) !=
        cudaSuccess) {
      v.clear();
    }
    return v;
  }

 private:
  size_t n_;
  T* ptr_ = nullptr;
};

struct Piece {
  int64_t begin;
  int64_t len;
  int64_t stride;  // >= len
};

struct Result {
  std::vector<uint64_t> accumulator;
  std::vector<float> output;
  KernelStatus status;
};

using testing::RandomInput;

// Lays out piece `pc` of x ([batch, p]) with its row stride.
std::vector<float> PieceBuffer(const std::vector<float>& x, int64_t batch,
                               int64_t p, const Piece& pc) {
  std::vector<float> buf(batch * pc.stride + 1, 0.0f);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < pc.len; ++i) {
      buf[b * pc.stride + i] = x[b * p + pc.begin + i];
    }
  }
  return buf;
}

Result RunCpu(const ProjectionSpec& spec, const std::vector<float>& x,
              int64_t batch, int64_t p, int64_t base, double scale,
              const std::vector<Piece>& pieces) {
  Result r;
  r.accumulator.assign(ProjectionAccumulatorWords(spec, batch), 0);
  for (const Piece& pc : pieces) {
    const std::vector<float> buf = PieceBuffer(x, batch, p, pc);
    KernelStatus s =
        ProjectAccumulateCpu(spec, buf.data(), batch, pc.len, pc.stride,
                             base + pc.begin, scale, r.accumulator.data());
    if (!s.ok()) r.status = s;
  }
  r.output.assign(batch * spec.output_dim, 0.0f);
  KernelStatus s =
      ProjectFinalizeCpu(spec, r.accumulator.data(), batch, r.output.data());
  if (r.status.ok()) r.status = s;
  return r;
}

Result RunCuda(const ProjectionSpec& spec, const std::vector<float>& x,
               int64_t batch, int64_t p, int64_t base, double scale,
               const std::vector<Piece>& pieces, cudaStream_t stream) {
  Result r;
  const int64_t words = ProjectionAccumulatorWords(spec, batch);
  DeviceBuffer<uint64_t> acc(words);
  DeviceBuffer<float> out(batch * spec.output_dim);
  r.status = ProjectResetCuda(spec, batch, acc.get(), stream);
  if (!r.status.ok()) return r;
  std::vector<std::unique_ptr<DeviceBuffer<float>>> keep;  // until the sync
  for (const Piece& pc : pieces) {
    const std::vector<float> buf = PieceBuffer(x, batch, p, pc);
    keep.push_back(std::make_unique<DeviceBuffer<float>>(buf.size()));
    if (!keep.back()->Upload(buf)) {
      r.status = KernelStatus::DeviceError("upload failed");
      return r;
    }
    r.status = ProjectAccumulateCuda(spec, keep.back()->get(), batch, pc.len,
                                     pc.stride, base + pc.begin, scale,
                                     acc.get(), stream);
    if (!r.status.ok()) return r;
  }
  r.status = ProjectFinalizeCuda(spec, acc.get(), batch, out.get(), stream);
  r.accumulator = acc.Download();
  r.output = out.Download();
  return r;
}

std::vector<Piece> RandomPieces(int64_t p, uint64_t seed, int64_t max_len) {
  std::mt19937_64 rng(seed);
  std::vector<Piece> pieces;
  for (int64_t at = 0; at < p;) {
    const int64_t len = std::min<int64_t>(
        p - at, std::uniform_int_distribution<int64_t>(0, max_len)(rng));
    pieces.push_back({at, len, len + int64_t(rng() % 5)});
    at += len;
  }
  std::shuffle(pieces.begin(), pieces.end(), rng);
  return pieces;
}

ProjectionSpec Spec(ProjectionType type, int64_t d, int s, uint64_t seed) {
  ProjectionSpec spec;
  spec.type = type;
  spec.output_dim = d;
  spec.sparsity = s;
  spec.seed = seed;
  return spec;
}

std::string Describe(const ProjectionSpec& spec, int64_t batch) {
  return std::string(ProjectionTypeName(spec.type)) +
         " D=" + std::to_string(spec.output_dim) +
         " s=" + std::to_string(spec.sparsity) +
         " seed=" + std::to_string(spec.seed) + " B=" + std::to_string(batch);
}

class StreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_DEVICE();
    ASSERT_CUDA(cudaStreamCreate(&stream_));
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  cudaStream_t stream_ = nullptr;
};

using ProjectionGpuTest = StreamTest;

TEST_F(ProjectionGpuTest, MatchesCpuBitwise) {
  struct Case {
    ProjectionSpec spec;
    int64_t batch;
    int64_t p;
    int64_t base;
  };
  const int64_t huge = (int64_t{1} << 32) - 1000;
  const Case cases[] = {
      {Spec(ProjectionType::kSjlt, 1, 1, 1), 1, 5000, 0},
      {Spec(ProjectionType::kSjlt, 64, 4, 2), 5, 20000, huge},
      {Spec(ProjectionType::kSjlt, 1000, 8, 3), 37, 3000, 17},
      {Spec(ProjectionType::kSjlt, 1024, 4, 4), 1, 300000, 0},
      // Larger than one shared-memory window: several row tiles.
      {Spec(ProjectionType::kSjlt, 7000, 5, 5), 3, 50000, int64_t{1} << 40},
      {Spec(ProjectionType::kSjlt, 16384, 2, 6), 2, 100000, 0},
      {Spec(ProjectionType::kRademacher, 1, 0, 7), 2, 5000, 0},
      {Spec(ProjectionType::kRademacher, 130, 0, 8), 5, 20000, huge},
      {Spec(ProjectionType::kRademacher, 1024, 0, 9), 9, 30000, 3},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(Describe(c.spec, c.batch) + " p=" + std::to_string(c.p) +
                 " base=" + std::to_string(c.base));
    const std::vector<float> x = RandomInput(c.batch * c.p, c.spec.seed);
    const std::vector<Piece> pieces =
        RandomPieces(c.p, c.spec.seed, c.p / 3 + 1);
    const Result cpu = RunCpu(c.spec, x, c.batch, c.p, c.base, 0.03, pieces);
    const Result gpu =
        RunCuda(c.spec, x, c.batch, c.p, c.base, 0.03, pieces, stream_);
    ASSERT_TRUE(cpu.status.ok()) << cpu.status.ToString();
    ASSERT_TRUE(gpu.status.ok()) << gpu.status.ToString();
    EXPECT_EQ(gpu.accumulator, cpu.accumulator);
    ASSERT_EQ(gpu.output.size(), cpu.output.size());
    EXPECT_EQ(std::memcmp(gpu.output.data(), cpu.output.data(),
                          cpu.output.size() * sizeof(float)),
              0);
  }
}

TEST_F(ProjectionGpuTest, SplitAndRepeatGiveIdenticalBits) {
  for (ProjectionType type :
       {ProjectionType::kSjlt, ProjectionType::kRademacher}) {
    const ProjectionSpec spec = Spec(type, 512, 4, 21);
    SCOPED_TRACE(Describe(spec, 3));
    const int64_t p = 1 << 20;
    const std::vector<float> x = RandomInput(3 * p, 21);
    const Result whole = RunCuda(spec, x, 3, p, 0, 1e-3, {{0, p, p}}, stream_);
    const Result again = RunCuda(spec, x, 3, p, 0, 1e-3, {{0, p, p}}, stream_);
    const Result split =
        RunCuda(spec, x, 3, p, 0, 1e-3, RandomPieces(p, 5, 100000), stream_);
    ASSERT_TRUE(whole.status.ok()) << whole.status.ToString();
    EXPECT_EQ(again.accumulator, whole.accumulator);
    EXPECT_EQ(split.accumulator, whole.accumulator);
  }
}

TEST_F(ProjectionGpuTest, BadDataIsReportedByFinalize) {
  const ProjectionSpec spec = Spec(ProjectionType::kSjlt, 16, 2, 1);
  std::vector<float> x(2 * 100, 1.0f);
  x[100 + 7] = std::nanf("");
  const Result nan = RunCuda(spec, x, 2, 100, 0, 1.0, {{0, 100, 100}}, stream_);
  EXPECT_EQ(nan.status.code(), KernelCode::kInvalidArgument);
  EXPECT_NE(nan.status.message().find("input vector 1"), std::string::npos)
      << nan.status.ToString();
  // 4096 values of 2^19 reach the L1 bound, as on the CPU.
  const ProjectionSpec one = Spec(ProjectionType::kSjlt, 1, 1, 1);
  const std::vector<float> big(4096, 524288.0f);
  const Result l1 = RunCuda(one, big, 1, 4096, 0, 1.0,
                            {{0, 1000, 1000}, {1000, 3096, 3096}}, stream_);
  EXPECT_EQ(l1.status.code(), KernelCode::kInvalidArgument);
  EXPECT_NE(l1.status.message().find("L1"), std::string::npos)
      << l1.status.ToString();
  const Result ok =
      RunCuda(one, big, 1, 4095, 0, 1.0, {{0, 4095, 4095}}, stream_);
  EXPECT_TRUE(ok.status.ok()) << ok.status.ToString();
}

TEST_F(ProjectionGpuTest, RefusesPageableHostPointers) {
  const ProjectionSpec spec = Spec(ProjectionType::kSjlt, 16, 2, 1);
  std::vector<float> host(10, 1.0f);
  DeviceBuffer<uint64_t> acc(ProjectionAccumulatorWords(spec, 1));
  ASSERT_TRUE(ProjectResetCuda(spec, 1, acc.get(), stream_).ok());
  const KernelStatus s = ProjectAccumulateCuda(spec, host.data(), 1, 10, 10, 0,
                                               1.0, acc.get(), stream_);
  EXPECT_EQ(s.code(), KernelCode::kInvalidArgument) << s.ToString();
  EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
}

TEST_F(ProjectionGpuTest, ProjectorMatchesCpuProjector) {
  const ProjectionSpec spec = Spec(ProjectionType::kSjlt, 256, 4, 77);
  const int64_t p = 100000, batch = 4;
  const std::vector<float> x = RandomInput(batch * p, 77);
  DeviceBuffer<float> dx(x.size());
  ASSERT_TRUE(dx.Upload(x));
  DeviceBuffer<float> dout(batch * 256);
  std::unique_ptr<Projector> gpu, cpu;
  ASSERT_TRUE(
      Projector::Create(spec, batch, Backend::kCuda, stream_, &gpu).ok());
  ASSERT_TRUE(
      Projector::Create(spec, batch, Backend::kCpu, nullptr, &cpu).ok());
  for (int64_t at : {int64_t{0}, int64_t{40000}}) {
    const int64_t len = at == 0 ? 40000 : p - 40000;
    ASSERT_TRUE(gpu->Accumulate(dx.get() + at, len, p, at, 0.5).ok());
    ASSERT_TRUE(cpu->Accumulate(x.data() + at, len, p, at, 0.5).ok());
  }
  std::vector<float> out(batch * 256);
  ASSERT_TRUE(gpu->Finalize(dout.get()).ok());
  ASSERT_TRUE(cpu->Finalize(out.data()).ok());
  const std::vector<float> got = dout.Download();
  EXPECT_EQ(std::memcmp(got.data(), out.data(), out.size() * sizeof(float)), 0);
}

#else  // !RETRACE_HAVE_CUDA

TEST(ProjectionGpuTest, MatchesCpuBitwise) {
  GTEST_SKIP() << CudaAvailabilityReason();
}

#endif  // RETRACE_HAVE_CUDA

}  // namespace
}  // namespace retrace::kernels
