// The CPU scan's matrix-unit (AMX) dot products, internal to retrace_kernels:
// kernels/scoring_cpu.cc calls them when ChooseCpuScanIsa gives kAmx.
// The arithmetic and its error are stated in kernels/scoring.h.
//
// One call computes the dots of up to 64 store rows (one slot piece each)
// with every query vector of that slot. The matrix unit multiplies a tile of
// 16 rows x 32 bf16 values (the store rows) by a tile of 32 x 16 bf16 values
// (16 query columns) into 16 x 16 fp32 sums. Each fp32 query vector becomes
// two columns, hi and lo (ScaledSplit below), so 4 columns per query:
// raw hi, raw lo, unit hi, unit lo. A bf16 row enters as stored; an fp16
// row is split exactly into hi (its top 8 significant bits) and lo (the
// other 3), and both tiles are multiplied by the same query tile into the
// same sums. Every sum runs over d in the same order (32 values per step,
// hi then lo) whatever the number of rows or columns in the call, so a
// (row, query) dot does not depend on the batch.
#ifndef RETRACE_KERNELS_SCAN_AMX_H_
#define RETRACE_KERNELS_SCAN_AMX_H_

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "kernels/dtype.h"

namespace retrace::kernels::amx {

inline constexpr int kTileRows = 16;  // store rows per tile
inline constexpr int kTileK = 32;     // bf16 values of d per step
inline constexpr int kTileCols = 16;  // query columns per tile
inline constexpr int kColsPerQuery = 4;
// Store rows per SlotDots call: four row tiles, so that one column tile
// (up to 4 queries) still keeps four independent sums in flight.
inline constexpr int kCallRows = 64;

// std::allocator on 64-byte boundaries. Every buffer that tiles are loaded
// from or stored to uses it: a tile row that straddles two cache lines costs
// two line reads, and the tile products ran at half speed or less with the
// 16-byte alignment of plain operator new (scan_bench, bf16 store, Q = 32).
template <typename T>
struct LineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), kAlign));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlign); }
  friend bool operator==(const LineAllocator&, const LineAllocator&) {
    return true;
  }
  friend bool operator!=(const LineAllocator&, const LineAllocator&) {
    return false;
  }
};
template <typename T>
using LineVector = std::vector<T, LineAllocator<T>>;

// A finite fp32 value v of a vector whose largest magnitude is `largest`
// as hi + lo bf16 bit patterns of v * 2^-e, where 2^e is Scale(largest).
// Round to nearest even both times; hi + lo is v * 2^-e within a relative
// 2^-16.
double Scale(float largest);
void ScaledSplit(float v, double inv_scale, uint16_t* hi, uint16_t* lo);

// The query vectors of every slot, packed as the matrix unit reads them.
class PackedQueries {
 public:
  // vectors: for slot cs, query q, method m the fp32 vector at
  // vectors[((cs * num_queries + q) * 2 + m) * stride], d values.
  void Pack(int64_t slot_pairs, int32_t num_queries, int64_t d,
            const float* vectors, int64_t stride);

  int32_t num_queries() const { return num_queries_; }
  int64_t d() const { return d_; }
  int64_t k_steps() const { return k_steps_; }
  int64_t col_tiles() const { return col_tiles_; }
  // Slot cs's tiles: [k_steps][col_tiles][16 pairs of d][16 columns][2].
  const uint16_t* Slot(int64_t cs) const {
    return tiles_.data() + cs * k_steps_ * col_tiles_ * kTileK * kTileCols;
  }
  // The powers of two that undo the scaling of slot cs's vectors,
  // [num_queries][2]: vector (q, m) at 2q + m.
  const double* Unscales(int64_t cs) const {
    return unscale_.data() + cs * num_queries_ * 2;
  }

 private:
  int32_t num_queries_ = 0;
  int64_t d_ = 0;
  int64_t k_steps_ = 0;
  int64_t col_tiles_ = 0;
  LineVector<uint16_t> tiles_;
  std::vector<double> unscale_;
};

// Per-thread buffers for SlotDots.
struct Scratch {
  // Rows k_steps * 32 + 32 values apart (one line of padding, see RowStride).
  LineVector<uint16_t> hi;  // [64][row stride] the rows' hi parts
  LineVector<uint16_t> lo;  // [64][row stride] lo parts (fp16 stores)
  LineVector<float> sums;   // [64][col_tiles * 16]
  void Resize(const PackedQueries& queries);
};

// Holds the matrix unit's tile configuration for the calling thread while
// it lives (the tile registers are per thread and must be configured before
// use and released after). SlotDots runs only inside one.
class TileSession {
 public:
  TileSession();
  ~TileSession();
  TileSession(const TileSession&) = delete;
  TileSession& operator=(const TileSession&) = delete;
};

// Store rows that the next SlotDots call will read: `count` rows of `bytes`
// each, `stride` bytes apart.
struct NextRows {
  const void* rows = nullptr;
  int64_t stride = 0;
  int count = 0;
  int64_t bytes = 0;
};

// For rows r < `rows` (1..kCallRows) of `dtype` (kF16 or kBF16) at
// u + r * u_stride elements, d = queries.d() values each, and every query
// (q, m) of slot cs: out[r * out_stride + 2 * q + m] = <u_r, query_qm>.
// When the rows go through the scratch buffer (fp16, or bf16 that is not
// read as whole tiles from the store), `next` is asked into L2 a few lines
// per tile step while this call computes, so that the next call's copy
// reads cache instead of memory.
void SlotDots(DType dtype, const void* u, int64_t u_stride, int rows,
              const PackedQueries& queries, int64_t cs, Scratch* scratch,
              float* out, int64_t out_stride, const NextRows& next = {});

// The matrix unit's bf16 peak: multiply-adds per second that one thread
// sustains over `seconds` of back-to-back independent tile products (for the
// benchmark's limits). Only on a CPU where ResolveCpuIsa gives kAmx.
double PeakMacsPerSecond(double seconds);

}  // namespace retrace::kernels::amx

#endif  // RETRACE_KERNELS_SCAN_AMX_H_
