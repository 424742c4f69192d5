// The matrix-unit dot products of the CPU scan; see scan_amx.h.
//
// Tile registers: tmm0-3 hold four sum tiles (2 row tiles x 2 column tiles,
// or 4 x 1 with one column tile), tmm4 a row tile's hi values, tmm5 its lo
// values (fp16 stores), tmm6 and tmm7 the step's query tiles (Block below).
// The tile instructions are written as inline assembly with a memory
// clobber: the compiler must neither move the buffer stores of the split rows
// past a tile load nor keep a value of the sums in a register across a tile
// store.
#include "kernels/scan_amx.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#define RETRACE_AMX_X86 1
#endif

namespace retrace::kernels::amx {
namespace {

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Round to nearest even of a finite fp32 value to bf16.
uint16_t Bf16Bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

float Bf16Value(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

}  // namespace

double Scale(float largest) {
  if (!(largest > 0.0f)) return 1.0;
  int e = 0;
  std::frexp(double(largest), &e);  // largest = f * 2^e, f in [0.5, 1)
  return std::ldexp(1.0, e);
}

void ScaledSplit(float v, double inv_scale, uint16_t* hi, uint16_t* lo) {
  const float s = float(double(v) * inv_scale);  // a power of two: exact
  *hi = Bf16Bits(s);
  *lo = Bf16Bits(s - Bf16Value(*hi));
}

void PackedQueries::Pack(int64_t slot_pairs, int32_t num_queries, int64_t d,
                         const float* vectors, int64_t stride) {
  num_queries_ = num_queries;
  d_ = d;
  k_steps_ = RoundUp(d, kTileK) / kTileK;
  col_tiles_ =
      RoundUp(int64_t{num_queries} * kColsPerQuery, kTileCols) / kTileCols;
  const int64_t tile_values = int64_t{kTileK} * kTileCols;
  tiles_.assign(size_t(slot_pairs * k_steps_ * col_tiles_ * tile_values), 0);
  unscale_.assign(size_t(slot_pairs * num_queries * 2), 1.0);
  for (int64_t cs = 0; cs < slot_pairs; ++cs) {
    uint16_t* slot = tiles_.data() + cs * k_steps_ * col_tiles_ * tile_values;
    for (int32_t q = 0; q < num_queries; ++q) {
      for (int m = 0; m < 2; ++m) {
        const float* v = vectors + ((cs * num_queries + q) * 2 + m) * stride;
        float largest = 0.0f;
        for (int64_t i = 0; i < d; ++i) {
          largest = std::max(largest, std::fabs(v[i]));
        }
        const double scale = Scale(largest);
        unscale_[size_t((cs * num_queries + q) * 2 + m)] = scale;
        const int64_t col = int64_t{q} * kColsPerQuery + 2 * m;  // hi; lo + 1
        const int64_t tile = col / kTileCols;
        const int64_t n = col % kTileCols;
        for (int64_t i = 0; i < d; ++i) {
          uint16_t hi = 0, lo = 0;
          ScaledSplit(v[i], 1.0 / scale, &hi, &lo);
          // Pair i / 2 of step i / 32, element i % 2 of the pair.
          uint16_t* t = slot + ((i / kTileK) * col_tiles_ + tile) * tile_values;
          const int64_t at =
              ((i % kTileK) / 2) * (kTileCols * 2) + n * 2 + i % 2;
          t[at] = hi;
          t[at + 2] = lo;  // the next column
        }
      }
    }
  }
}

// Values from one scratch row to the next: a row's padded length and one
// cache line more, so that the 16 rows of a tile (or 32 of two) fall into
// different L1 sets; at exactly 2 KiB apart (d = 1024) they share two sets,
// and loading them evicts the tile read just before.
namespace {
int64_t RowStride(const PackedQueries& queries) {
  return queries.k_steps() * kTileK + kTileK;
}
}  // namespace

void Scratch::Resize(const PackedQueries& queries) {
  const size_t row_values = size_t(RowStride(queries));
  hi.resize(kCallRows * row_values);
  lo.resize(kCallRows * row_values);
  sums.resize(size_t(kCallRows * queries.col_tiles() * kTileCols));
}

#ifdef RETRACE_AMX_X86

#define RETRACE_AMX_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace {

// The tile instructions, with tile numbers as template arguments (printed
// into the instruction by the %c operand modifier).
template <int T>
inline void TileLoad(const void* base, int64_t stride) {
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(stride),
                   "i"(T)
                   : "memory");
}
template <int T>
inline void TileStore(void* base, int64_t stride) {
  __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(base), "r"(stride),
                   "i"(T)
                   : "memory");
}
template <int T>
inline void TileZero() {
  __asm__ volatile("tilezero %%tmm%c0" ::"i"(T));
}
// Sums (tile C) += rows (tile A) x queries (tile B), bf16 pairs into fp32.
template <int C, int A, int B>
inline void TileDp() {
  __asm__ volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A),
                   "i"(B));
}

template <typename F, int... I>
inline void UnrollSeq(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
// f(std::integral_constant<int, i>) for i = 0 .. N-1.
template <int N, typename F>
inline void Unroll(F&& f) {
  UnrollSeq(f, std::make_integer_sequence<int, N>{});
}

// Palette 1 with all eight tiles 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kTileValues = int64_t{kTileK} * kTileCols;

// Asks for the lines of NextRows into L2, spread evenly over `steps` tile
// steps (all of them by the last), row after row.
class NextCursor {
 public:
  NextCursor(const NextRows& rows, int64_t steps)
      : rows_(rows), lines_per_row_((rows.bytes + 63) / 64) {
    const int64_t lines = lines_per_row_ * rows.count;
    total_ = lines;
    per_step_ = steps > 0 ? (lines + steps - 1) / steps : lines;
  }
  void Step() {
    const int64_t end = std::min(total_, issued_ + per_step_);
    for (; issued_ < end; ++issued_) {
      const int64_t row = issued_ / lines_per_row_;
      const int64_t line = issued_ % lines_per_row_;
      __builtin_prefetch(static_cast<const uint8_t*>(rows_.rows) +
                             row * rows_.stride + line * 64,
                         0, 2);
    }
  }

 private:
  NextRows rows_;
  int64_t lines_per_row_;
  int64_t total_ = 0;
  int64_t per_step_ = 0;
  int64_t issued_ = 0;
};
constexpr int64_t kPrefetchSteps = 4;
// Whole bf16 tiles are read straight from the store when the rows' tiles are
// loaded by at most two column pairs; with more (over 16 queries) they are
// first copied row by row into the scratch buffer, which the hardware
// prefetchers stream and the later column pairs then read from L2. Measured
// on a bf16 store (scan_bench, 200k rows, alternating: three pairs at
// Q = 32, two at Q = 1 and 8): Q = 32 807-882 ms copied against 884-1121 ms
// direct; Q = 1 and 8 copied 343-355 and 408-428 ms against 223-231 and
// 288-319 ms direct.
constexpr int64_t kDirectMaxColTiles = 4;

// M row tiles x N column tiles (N = 1 or 2) of one slot over every step of
// d, M * N <= 4 sums in tmm0-3 (tile m * N + n). Row tile m's hi values at
// a_hi + m * 16 * a_stride bytes (lo at a_lo likewise), the column tiles'
// query values at b (the first of them in step 0; steps col_tiles tiles
// apart). The query tiles of a step stay in tmm6-7 while each row tile is
// loaded into tmm4 (and its lo part into tmm5). Every sum adds, step by
// step, hi rows x queries and then lo rows x queries: the blocking never
// changes a sum's order.
// With `prefetch`, each step also asks for the rows' values kPrefetchSteps
// steps ahead: rows read straight from the store are 16 separate streams per
// tile, too short for the hardware prefetchers to run ahead of the tile
// loads on their own. Each step also advances `next` (the next call's rows).
template <int M, int N, bool kLo>
void Block(const uint8_t* a_hi, const uint8_t* a_lo, int64_t a_stride,
           const uint16_t* b, int64_t col_tiles, int64_t k_steps, float* sums,
           int64_t sums_stride, bool prefetch, NextCursor* next) {
  static_assert(M * N <= 4 && N <= 2, "four sum tiles, two query tiles");
  Unroll<M * N>([](auto c) { TileZero<c>(); });
  for (int64_t ks = 0; ks < k_steps; ++ks) {
    const uint16_t* bk = b + ks * col_tiles * kTileValues;
    const int64_t x = ks * kTileK * 2;
    if (prefetch && ks + kPrefetchSteps < k_steps) {
      const uint8_t* ahead = a_hi + x + kPrefetchSteps * kTileK * 2;
      for (int r = 0; r < M * kTileRows; ++r) {
        __builtin_prefetch(ahead + r * a_stride);
      }
    }
    next->Step();
    TileLoad<6>(bk, 64);
    if constexpr (N == 2) TileLoad<7>(bk + kTileValues, 64);
    Unroll<M>([&](auto m) {
      const int64_t row = m * kTileRows * a_stride + x;
      TileLoad<4>(a_hi + row, a_stride);
      TileDp<m * N, 4, 6>();
      if constexpr (N == 2) TileDp<m * N + 1, 4, 7>();
      if constexpr (kLo) {
        TileLoad<5>(a_lo + row, a_stride);
        TileDp<m * N, 5, 6>();
        if constexpr (N == 2) TileDp<m * N + 1, 5, 7>();
      }
    });
  }
  Unroll<M * N>([&](auto c) {
    constexpr int m = c / N, n = c % N;
    TileStore<c>(reinterpret_cast<uint8_t*>(sums) +
                     m * kTileRows * sums_stride + n * kTileCols * 4,
                 sums_stride);
  });
}

using BlockFn = void (*)(const uint8_t*, const uint8_t*, int64_t,
                         const uint16_t*, int64_t, int64_t, float*, int64_t,
                         bool, NextCursor*);

template <bool kLo>
BlockFn BlockFor(int m, int n) {
  switch (m * 8 + n) {
    case 8 + 1:
      return &Block<1, 1, kLo>;
    case 8 + 2:
      return &Block<1, 2, kLo>;
    case 16 + 1:
      return &Block<2, 1, kLo>;
    case 16 + 2:
      return &Block<2, 2, kLo>;
    case 24 + 1:
      return &Block<3, 1, kLo>;
    default:
      return &Block<4, 1, kLo>;
  }
}

// Every row tile and column tile, four sum tiles at a time: four row tiles
// of one column tile, or two of two. A tile load costs about three tile
// products on the machine measured (docs/benchmarks.md), so the blocking
// that loads the fewest tiles per product wins: 2 x 2 loads 4 tiles for 4
// products (bf16), where 1 x 4 (one row tile, query tiles in turn) loads 5.
template <bool kLo>
void AllTiles(const void* a_hi, const void* a_lo, int64_t a_stride,
              int row_tiles, const PackedQueries& queries, int64_t cs,
              float* sums, int64_t sums_stride, bool prefetch,
              const NextRows& next_rows) {
  const int64_t col_tiles = queries.col_tiles();
  const int nb = col_tiles == 1 ? 1 : 2;
  const int mb = 4 / nb;
  const int64_t steps = int64_t{(row_tiles + mb - 1) / mb} *
                        ((col_tiles + nb - 1) / nb) * queries.k_steps();
  NextCursor next(next_rows, steps);
  const uint8_t* hi = static_cast<const uint8_t*>(a_hi);
  const uint8_t* lo = static_cast<const uint8_t*>(a_lo);
  for (int r0 = 0; r0 < row_tiles; r0 += mb) {
    const int m = std::min(mb, row_tiles - r0);
    const int64_t row = int64_t{r0} * kTileRows * a_stride;
    for (int64_t t0 = 0; t0 < col_tiles; t0 += nb) {
      const int n = int(std::min<int64_t>(nb, col_tiles - t0));
      BlockFor<kLo>(m, n)(
          hi + row, kLo ? lo + row : nullptr, a_stride,
          queries.Slot(cs) + t0 * kTileValues, col_tiles, queries.k_steps(),
          reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(sums) +
                                   r0 * kTileRows * sums_stride) +
              t0 * kTileCols,
          sums_stride, prefetch && t0 == 0, &next);
    }
  }
}

// The first `count` (0..16) of 16 fp16 values at p as fp32, the rest zero.
RETRACE_AMX_TARGET inline __m512 LoadF16(const uint16_t* p, int64_t count) {
  const __m256i h =
      count >= 16  ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
      : count <= 0 ? _mm256_setzero_si256()
                   : _mm256_maskz_loadu_epi16(__mmask16((1u << count) - 1), p);
  return _mm512_cvtph_ps(h);
}

// fp16 rows into hi/lo bf16 rows of k_steps * 32 values (zero-padded past d;
// rows from `rows` to `filled` all zero). hi keeps the top 8 significant bits
// of each value (its fp32 form with the low 16 bits cleared), lo = value - hi
// has at most 3 significant bits: both exact in bf16, so the conversion to bf16
// (round to nearest even) changes neither.
RETRACE_AMX_TARGET void SplitF16Rows(const uint16_t* u, int64_t u_stride,
                                     int rows, int filled, int64_t d,
                                     int64_t padded, int64_t stride,
                                     uint16_t* hi, uint16_t* lo) {
  const __m512i top = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  for (int r = 0; r < rows; ++r) {
    const uint16_t* src = u + r * u_stride;
    uint16_t* h = hi + r * stride;
    uint16_t* l = lo + r * stride;
    for (int64_t x = 0; x < padded; x += 32) {
      const __m512 v0 = LoadF16(src + x, d - x);
      const __m512 v1 = LoadF16(src + x + 16, d - x - 16);
      const __m512 h0 =
          _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v0), top));
      const __m512 h1 =
          _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v1), top));
      const __m512 l0 = _mm512_sub_ps(v0, h0);
      const __m512 l1 = _mm512_sub_ps(v1, h1);
      _mm512_storeu_si512(h + x, (__m512i)_mm512_cvtne2ps_pbh(h1, h0));
      _mm512_storeu_si512(l + x, (__m512i)_mm512_cvtne2ps_pbh(l1, l0));
    }
  }
  if (rows < filled) {
    std::memset(hi + rows * stride, 0,
                size_t((filled - rows) * stride) * sizeof(uint16_t));
    std::memset(lo + rows * stride, 0,
                size_t((filled - rows) * stride) * sizeof(uint16_t));
  }
}

// bf16 rows copied as stored, zero-padded like SplitF16Rows.
void CopyBf16Rows(const uint16_t* u, int64_t u_stride, int rows, int filled,
                  int64_t d, int64_t padded, int64_t stride, uint16_t* hi) {
  for (int r = 0; r < rows; ++r) {
    std::memcpy(hi + r * stride, u + r * u_stride, size_t(d) * 2);
    std::memset(hi + r * stride + d, 0, size_t(padded - d) * 2);
  }
  if (rows < filled) {
    std::memset(hi + rows * stride, 0,
                size_t((filled - rows) * stride) * sizeof(uint16_t));
  }
}

// Vector j = 2q + m's hi and lo sums are columns 2j and 2j + 1 of a row
// (kColsPerQuery = 4): out[j] = float((double(s[2j]) + double(s[2j + 1])) *
// unscale[j]) for j < n, eight at a time and then one by one, with the same
// IEEE operations either way.
static_assert(kColsPerQuery == 4, "two columns per vector");
RETRACE_AMX_TARGET void UnscaleSums(const float* s, const double* unscale,
                                    int64_t n, float* out) {
  const __m512i hi =
      _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i lo =
      _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 15, 13, 11, 9, 7, 5, 3, 1);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m512 v = _mm512_loadu_ps(s + 2 * j);
    const __m512d h =
        _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_permutexvar_ps(hi, v)));
    const __m512d l =
        _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_permutexvar_ps(lo, v)));
    const __m512d sum = _mm512_add_pd(h, l);
    _mm256_storeu_ps(out + j, _mm512_cvtpd_ps(_mm512_mul_pd(
                                  sum, _mm512_loadu_pd(unscale + j))));
  }
  for (; j < n; ++j) {
    out[j] = float((double(s[2 * j]) + double(s[2 * j + 1])) * unscale[j]);
  }
}

}  // namespace

TileSession::TileSession() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = kTileRows;
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(config) : "memory");
}

TileSession::~TileSession() { __asm__ volatile("tilerelease" ::: "memory"); }

void SlotDots(DType dtype, const void* u, int64_t u_stride, int rows,
              const PackedQueries& queries, int64_t cs, Scratch* scratch,
              float* out, int64_t out_stride, const NextRows& next) {
  const int64_t d = queries.d();
  const int64_t padded = queries.k_steps() * kTileK;
  const int64_t stride = RowStride(queries);
  const int64_t sums_row = queries.col_tiles() * kTileCols;
  float* sums = scratch->sums.data();
  const uint16_t* rows16 = static_cast<const uint16_t*>(u);
  const int row_tiles = (rows + kTileRows - 1) / kTileRows;
  const int filled = row_tiles * kTileRows;
  if (dtype == DType::kF16) {
    SplitF16Rows(rows16, u_stride, rows, filled, d, padded, stride,
                 scratch->hi.data(), scratch->lo.data());
    AllTiles<true>(scratch->hi.data(), scratch->lo.data(), stride * 2,
                   row_tiles, queries, cs, sums, sums_row * 4, false, next);
  } else if (rows == filled && d == padded &&
             queries.col_tiles() <= kDirectMaxColTiles) {
    // Whole bf16 tiles straight from the store.
    AllTiles<false>(u, nullptr, u_stride * 2, row_tiles, queries, cs, sums,
                    sums_row * 4, true, NextRows{});
  } else {
    CopyBf16Rows(rows16, u_stride, rows, filled, d, padded, stride,
                 scratch->hi.data());
    AllTiles<false>(scratch->hi.data(), nullptr, stride * 2, row_tiles, queries,
                    cs, sums, sums_row * 4, false, next);
  }
  const int64_t vectors = int64_t{queries.num_queries()} * 2;
  const double* unscale = queries.Unscales(cs);
  for (int r = 0; r < rows; ++r) {
    UnscaleSums(sums + r * sums_row, unscale, vectors, out + r * out_stride);
  }
}

double PeakMacsPerSecond(double seconds) {
  TileSession session;
  alignas(64) static uint16_t a[kTileRows * kTileK] = {};
  alignas(64) static uint16_t b[kTileK * kTileCols] = {};
  alignas(64) static float c[kTileRows * kTileCols];
  TileLoad<4>(a, 64);
  TileLoad<5>(a, 64);
  TileLoad<6>(b, 64);
  TileLoad<7>(b, 64);
  Unroll<4>([](auto t) { TileZero<t>(); });
  constexpr int64_t kRounds = 1 << 14;  // x 8 products per round
  int64_t products = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0.0;
  do {
    for (int64_t i = 0; i < kRounds; ++i) {
      TileDp<0, 4, 6>();
      TileDp<1, 4, 7>();
      TileDp<2, 5, 6>();
      TileDp<3, 5, 7>();
      TileDp<0, 5, 7>();
      TileDp<1, 5, 6>();
      TileDp<2, 4, 7>();
      TileDp<3, 4, 6>();
    }
    products += 8 * kRounds;
    elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
  } while (elapsed < seconds);
  TileStore<0>(c, 64);
  return double(products) * kTileRows * kTileCols * kTileK / elapsed;
}

#else  // !RETRACE_AMX_X86

// No matrix unit on this architecture: ResolveCpuIsa never gives kAmx, so
// nothing below runs.
TileSession::TileSession() {}
TileSession::~TileSession() {}
void SlotDots(DType, const void*, int64_t, int, const PackedQueries&, int64_t,
              Scratch*, float*, int64_t, const NextRows&) {}
double PeakMacsPerSecond(double) { return 0.0; }

#endif  // RETRACE_AMX_X86

}  // namespace retrace::kernels::amx
