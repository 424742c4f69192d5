#include "bench/cpu_peak.h"

#include <algorithm>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/cpu_isa.h"
#include "kernels/scan_amx.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define RETRACE_PEAK_X86 1
#endif

namespace retrace::bench {
namespace {

template <typename F>
double BestOfThree(int threads, F body) {
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    const double t0 = Now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back(body, t);
    for (auto& th : pool) th.join();
    best = std::min(best, Now() - t0);
  }
  return best;
}

uint64_t SumWords(const uint64_t* w, int64_t b, int64_t e) {
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = b;
  for (; i + 4 <= e; i += 4) {
    s0 += w[i];
    s1 += w[i + 1];
    s2 += w[i + 2];
    s3 += w[i + 3];
  }
  for (; i < e; ++i) s0 += w[i];
  return s0 + s1 + s2 + s3;
}

#ifdef RETRACE_PEAK_X86
__attribute__((target("avx2"))) uint64_t SumWordsAvx2(const uint64_t* w,
                                                      int64_t b, int64_t e) {
  __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(),
                  _mm256_setzero_si256(), _mm256_setzero_si256()};
  int64_t i = b;
  for (; i + 16 <= e; i += 16) {
    for (int j = 0; j < 4; ++j) {
      s[j] = _mm256_add_epi64(
          s[j],
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i + 4 * j)));
    }
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                     _mm256_add_epi64(_mm256_add_epi64(s[0], s[1]),
                                      _mm256_add_epi64(s[2], s[3])));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + SumWords(w, i, e);
}

// 64-byte loads, four per step: on the AVX-512 machines measured a core
// reads a third faster with them than with AVX2's 32-byte loads, so the
// bandwidth the scan is compared with is what the widest loads reach.
__attribute__((target("avx512f"))) uint64_t SumWordsAvx512(const uint64_t* w,
                                                           int64_t b,
                                                           int64_t e) {
  __m512i s[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(),
                  _mm512_setzero_si512(), _mm512_setzero_si512()};
  int64_t i = b;
  for (; i + 32 <= e; i += 32) {
    for (int j = 0; j < 4; ++j) {
      s[j] = _mm512_add_epi64(s[j], _mm512_loadu_si512(w + i + 8 * j));
    }
  }
  const __m512i t = _mm512_add_epi64(_mm512_add_epi64(s[0], s[1]),
                                     _mm512_add_epi64(s[2], s[3]));
  return uint64_t(_mm512_reduce_add_epi64(t)) + SumWords(w, i, e);
}

template <int kChains>
__attribute__((target("avx2,fma"))) float FmaChains8(int64_t iters) {
  __m256 acc[kChains];
#pragma GCC unroll 16
  for (int j = 0; j < kChains; ++j) acc[j] = _mm256_set1_ps(0.001f * j);
  const __m256 m = _mm256_set1_ps(0.999999f), a = _mm256_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < kChains; ++j) acc[j] = _mm256_fmadd_ps(acc[j], m, a);
  }
  __m256 s = acc[0];
  for (int j = 1; j < kChains; ++j) s = _mm256_add_ps(s, acc[j]);
  return _mm256_cvtss_f32(s);
}

template <int kChains>
__attribute__((target("avx512f"))) float FmaChains16(int64_t iters) {
  __m512 acc[kChains];
#pragma GCC unroll 16
  for (int j = 0; j < kChains; ++j) acc[j] = _mm512_set1_ps(0.001f * j);
  const __m512 m = _mm512_set1_ps(0.999999f), a = _mm512_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < kChains; ++j) acc[j] = _mm512_fmadd_ps(acc[j], m, a);
  }
  __m512 s = acc[0];
  for (int j = 1; j < kChains; ++j) s = _mm512_add_ps(s, acc[j]);
  return _mm512_reduce_add_ps(s);
}
#endif

}  // namespace

double ReadBandwidth(const void* buf, int64_t bytes, int threads) {
  const uint64_t* w = static_cast<const uint64_t*>(buf);
  const int64_t words = bytes / 8;
  std::vector<uint64_t> sums(size_t(threads) * 8);
  bool wide = false, wider = false;
#ifdef RETRACE_PEAK_X86
  wide = __builtin_cpu_supports("avx2");
  wider = __builtin_cpu_supports("avx512f");
#endif
  const double t = BestOfThree(threads, [&](int th) {
    const int64_t b = words * th / threads, e = words * (th + 1) / threads;
#ifdef RETRACE_PEAK_X86
    if (wider) {
      sums[size_t(th) * 8] = SumWordsAvx512(w, b, e);
      return;
    }
    if (wide) {
      sums[size_t(th) * 8] = SumWordsAvx2(w, b, e);
      return;
    }
#endif
    sums[size_t(th) * 8] = SumWords(w, b, e);
  });
  volatile uint64_t sink = 0;
  for (uint64_t s : sums) sink = sink + s;
  (void)wide;
  (void)wider;
  return double(bytes) / t;
}

double FmaPeak(int lanes, int threads) {
#ifdef RETRACE_PEAK_X86
  // 12 independent chains cover the FMA latency (4-5 cycles) on two ports.
  constexpr int kChains = 12;
  constexpr int64_t kIters = 20'000'000;
  std::vector<float> sink(size_t(threads) * 16);
  double t = 0;
  if (lanes == 8 && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma")) {
    t = BestOfThree(threads, [&](int th) {
      sink[size_t(th) * 16] = FmaChains8<kChains>(kIters);
    });
  } else if (lanes == 16 && __builtin_cpu_supports("avx512f")) {
    t = BestOfThree(threads, [&](int th) {
      sink[size_t(th) * 16] = FmaChains16<kChains>(kIters);
    });
  } else {
    return 0;
  }
  volatile float keep = 0;
  for (float s : sink) keep = keep + s;
  return double(threads) * kIters * kChains * lanes / t;
#else
  (void)lanes;
  (void)threads;
  return 0;
#endif
}

double AmxPeak(int threads) {
  kernels::CpuIsa chosen = kernels::CpuIsa::kScalar;
  if (!kernels::ResolveCpuIsa(kernels::CpuIsa::kAmx, &chosen).ok()) return 0;
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    std::vector<double> rates(static_cast<size_t>(threads));
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&rates, t] {
        rates[size_t(t)] = kernels::amx::PeakMacsPerSecond(0.2);
      });
    }
    for (auto& th : pool) th.join();
    double sum = 0;
    for (double r : rates) sum += r;
    best = std::max(best, sum);
  }
  return best;
}

}  // namespace retrace::bench
