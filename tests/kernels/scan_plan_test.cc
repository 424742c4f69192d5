// Host-side logic of the CUDA scan that runs without a device: the choice
// of arithmetic path, the launch shapes and the scratch layout, checked
// against arithmetic written out here.
#include "kernels/scan_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "kernels/device.h"
#include "kernels/scoring.h"

namespace retrace::kernels {
namespace {

TEST(ChooseCudaScanPathTest, AutoPicksTensorCoresForSixteenBitStores) {
  struct Want {
    DType dtype;
    int32_t dim;
    CudaScanPath path;
  };
  for (const Want& w : {Want{DType::kF16, 16, CudaScanPath::kTensorCore},
                        Want{DType::kBF16, 4096, CudaScanPath::kTensorCore},
                        Want{DType::kF16, 17, CudaScanPath::kTensorCore},
                        Want{DType::kF16, 15, CudaScanPath::kFp32},
                        Want{DType::kBF16, 1, CudaScanPath::kFp32},
                        Want{DType::kF32, 1024, CudaScanPath::kFp32}}) {
    SCOPED_TRACE(std::string(DTypeName(w.dtype)) +
                 " D=" + std::to_string(w.dim));
    CudaScanPath chosen = CudaScanPath::kAuto;
    ASSERT_TRUE(ChooseCudaScanPath(StoreLayout{w.dtype, 2, 6, w.dim},
                                   CudaScanPath::kAuto, &chosen)
                    .ok());
    EXPECT_EQ(chosen, w.path);
  }
}

TEST(ChooseCudaScanPathTest, ExplicitChoicesAndRefusals) {
  CudaScanPath chosen = CudaScanPath::kAuto;
  // Forced paths are kept, even tensor cores on a short dim.
  ASSERT_TRUE(ChooseCudaScanPath(StoreLayout{DType::kF16, 1, 1, 4},
                                 CudaScanPath::kTensorCore, &chosen)
                  .ok());
  EXPECT_EQ(chosen, CudaScanPath::kTensorCore);
  ASSERT_TRUE(ChooseCudaScanPath(StoreLayout{DType::kBF16, 1, 1, 512},
                                 CudaScanPath::kFp32, &chosen)
                  .ok());
  EXPECT_EQ(chosen, CudaScanPath::kFp32);
  const KernelStatus s = ChooseCudaScanPath(StoreLayout{DType::kF32, 1, 1, 512},
                                            CudaScanPath::kTensorCore, &chosen);
  EXPECT_EQ(s.code(), KernelCode::kInvalidArgument);
  EXPECT_NE(s.message().find("F32"), std::string::npos) << s.ToString();
  EXPECT_EQ(ChooseCudaScanPath(StoreLayout{DType::kF16, 1, 1, 512},
                               static_cast<CudaScanPath>(7), &chosen)
                .code(),
            KernelCode::kInvalidArgument);
  EXPECT_EQ(ChooseCudaScanPath(StoreLayout{DType::kF16, 1, 1, 512},
                               CudaScanPath::kAuto, nullptr)
                .code(),
            KernelCode::kInvalidArgument);
}

TEST(ScanPlanTest, LaunchShapes) {
  // (Q, fp32 column groups, tensor-core fragments)
  const std::vector<std::pair<int, std::pair<int, int>>> want = {
      {1, {1, 1}},  {2, {1, 1}},   {3, {2, 1}},   {8, {4, 1}},   {9, {8, 2}},
      {16, {8, 2}}, {17, {16, 4}}, {32, {16, 4}}, {33, {32, 8}}, {64, {32, 8}}};
  for (const auto& [q, shape] : want) {
    SCOPED_TRACE("Q=" + std::to_string(q));
    EXPECT_EQ(Fp32ColumnGroups(q), shape.first);
    EXPECT_EQ(TensorColumnFragments(q), shape.second);
    EXPECT_GE(4 * Fp32ColumnGroups(q), 2 * q);
    EXPECT_GE(kTensorFragment * TensorColumnFragments(q), 2 * q);
  }
  // The largest batch stays within the kernels' configurations.
  EXPECT_LE(TensorColumnFragments(kMaxQueries), 8);
  EXPECT_LE(Fp32ColumnGroups(kMaxQueries), 32);
  EXPECT_EQ(TensorPaddedDim(1), 16);
  EXPECT_EQ(TensorPaddedDim(16), 16);
  EXPECT_EQ(TensorPaddedDim(17), 32);
  EXPECT_EQ(TensorPaddedDim(4096), 4096);
}

TEST(ScanPlanTest, SelectionSlicesCoverEveryPosition) {
  for (int64_t n :
       {int64_t{1}, int64_t{100}, kSelectSliceRows, kSelectSliceRows + 1,
        int64_t{1000000}, int64_t{4000000000}}) {
    SCOPED_TRACE("N=" + std::to_string(n));
    const int64_t slices = SelectSlices(n);
    const int64_t rows = SelectSliceRows(n);
    EXPECT_GE(slices, 1);
    EXPECT_LE(slices, kMaxSelectSlices);
    EXPECT_GE(slices * rows, n);        // every position in some slice
    EXPECT_LT((slices - 1) * rows, n);  // and no slice is empty
    if (n <= kSelectSliceRows * kMaxSelectSlices) {
      EXPECT_LE(rows, kSelectSliceRows);
    }
  }
  EXPECT_EQ(SelectSlices(kSelectSliceRows), 1);
  EXPECT_EQ(SelectSlices(kSelectSliceRows + 1), 2);
  // A million rows and one query: 62 blocks per column, not one.
  EXPECT_EQ(SelectSlices(1000000), 62);
}

size_t Aligned(size_t bytes) {
  return (bytes + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
}

TEST(ScanPlanTest, ScratchLayoutTensorCore) {
  const StoreLayout layout{DType::kF16, 2, 3, 40};  // C*S = 6, Dpad = 48
  ScanOptions opt;
  opt.k = 7;
  opt.want_bottom = true;
  opt.want_breakdown = true;
  const ScratchPlan p =
      PlanScanScratch(layout, 1000, 5, opt, CudaScanPath::kTensorCore);
  EXPECT_EQ(p.padded_columns, 16);
  EXPECT_EQ(p.qhi, 0u);
  EXPECT_EQ(p.qlo, Aligned(6 * 48 * 16 * 2));
  EXPECT_EQ(p.inv_scale, 2 * Aligned(6 * 48 * 16 * 2));
  size_t at = p.inv_scale + Aligned(6 * 16 * 4);
  EXPECT_EQ(p.scale, at);
  at += Aligned(6 * 16 * 4);
  EXPECT_EQ(p.slot_active, at);
  at += Aligned(6 * 4);
  EXPECT_EQ(p.bad, at);
  at += Aligned(8);
  EXPECT_EQ(p.scores, at);
  at += Aligned(10 * 1000 * 4);  // [2Q, N] fp32
  EXPECT_EQ(p.radix_state, at);
  at += Aligned(10 * 2 * 16);
  EXPECT_EQ(p.histogram, at);
  at += Aligned(10 * 2 * kRadixBins * 4);
  EXPECT_EQ(p.tie_counts, at);
  at += Aligned(10 * 2 * 1 * 4);
  EXPECT_EQ(p.selected, at);
  at += Aligned(10 * 2 * 7 * 8);
  EXPECT_EQ(p.breakdown, at);
  at += Aligned(10 * 2 * 7 * 6 * 4);
  EXPECT_EQ(p.total, at);
  EXPECT_EQ(p.qmat, 0u);
}

TEST(ScanPlanTest, ScratchLayoutFp32) {
  const StoreLayout layout{DType::kF32, 1, 2, 33};
  ScanOptions opt;
  opt.k = 3;
  opt.want_bottom = false;
  opt.want_breakdown = false;
  const ScratchPlan p =
      PlanScanScratch(layout, 50, 3, opt, CudaScanPath::kFp32);
  EXPECT_EQ(p.padded_columns, 8);
  EXPECT_EQ(p.qmat, 0u);
  EXPECT_EQ(p.scale, Aligned(2 * 33 * 8 * 4));
  EXPECT_EQ(p.breakdown, 0u);
  EXPECT_EQ(p.selected + Aligned(6 * 1 * 3 * 8), p.total);
}

// Scratch sized for the largest request serves every smaller one: the size
// grows with Q, k, the bottom list and the breakdown, on both paths.
TEST(ScanPlanTest, ScratchGrowsWithEveryRequestDimension) {
  const StoreLayout layout{DType::kBF16, 2, 6, 100};
  for (CudaScanPath path : {CudaScanPath::kFp32, CudaScanPath::kTensorCore}) {
    SCOPED_TRACE(CudaScanPathName(path));
    ScanOptions big;
    big.k = kMaxTopK;
    big.want_bottom = true;
    big.want_breakdown = true;
    const size_t largest =
        PlanScanScratch(layout, 100000, kMaxQueries, big, path).total;
    size_t previous = 0;
    for (int q = 1; q <= kMaxQueries; ++q) {
      for (int32_t k : {1, 10, 4096}) {
        for (int flags = 0; flags < 4; ++flags) {
          ScanOptions o;
          o.k = k;
          o.want_bottom = (flags & 1) != 0;
          o.want_breakdown = (flags & 2) != 0;
          const size_t bytes =
              PlanScanScratch(layout, 100000, q, o, path).total;
          ASSERT_LE(bytes, largest) << "Q=" << q << " k=" << k;
          if (k == 4096 && flags == 3) {
            ASSERT_GE(bytes, previous) << "Q=" << q;
            previous = bytes;
          }
        }
      }
    }
  }
}

TEST(ScanPlanTest, CudaScanScratchBytesFollowsThePlan) {
  if (!BuiltWithCuda()) GTEST_SKIP() << "built without CUDA";
  const StoreLayout layout{DType::kF16, 2, 3, 40};
  // Pointers are not read: any non-null values will do.
  static const char kFake[16] = {};
  const std::vector<StoreChunk> chunks = {
      {kFake, reinterpret_cast<const float*>(kFake), 600, 0},
      {kFake, reinterpret_cast<const float*>(kFake), 400, 600}};
  ScanOptions opt;
  opt.k = 7;
  for (CudaScanPath path :
       {CudaScanPath::kAuto, CudaScanPath::kFp32, CudaScanPath::kTensorCore}) {
    SCOPED_TRACE(CudaScanPathName(path));
    opt.cuda_path = path;
    size_t bytes = 0;
    ASSERT_TRUE(CudaScanScratchBytes(layout, chunks, 5, opt, &bytes).ok());
    CudaScanPath chosen = CudaScanPath::kAuto;
    ASSERT_TRUE(ChooseCudaScanPath(layout, path, &chosen).ok());
    EXPECT_EQ(bytes, PlanScanScratch(layout, 1000, 5, opt, chosen).total);
  }
  opt.cuda_path = CudaScanPath::kTensorCore;
  size_t bytes = 0;
  EXPECT_EQ(CudaScanScratchBytes(StoreLayout{DType::kF32, 2, 3, 40}, chunks, 5,
                                 opt, &bytes)
                .code(),
            KernelCode::kInvalidArgument);
}

TEST(ScanPlanTest, ValidateScanRefusesUnknownPath) {
  static const float kFake[16] = {};
  const std::vector<StoreChunk> chunks = {{kFake, kFake, 10, 0}};
  const QueryBatch q{1, kFake, kFake, kFake, kFake};
  ScanOptions opt;
  opt.k = 3;
  opt.cuda_path = static_cast<CudaScanPath>(9);
  const KernelStatus s =
      ValidateScan(StoreLayout{DType::kF16, 1, 1, 8}, chunks, q, opt);
  EXPECT_EQ(s.code(), KernelCode::kInvalidArgument);
  EXPECT_NE(s.message().find("CUDA scan path"), std::string::npos)
      << s.ToString();
}

}  // namespace
}  // namespace retrace::kernels
