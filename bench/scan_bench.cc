// CPU scan benchmark (scripts/bench.sh scan): the fused TracIn + ReTrac scan
// against the LibTorch way a user would write (fp16 -> fp32 conversion,
// batched matmul per block of rows, then torch::topk) and against this
// machine's limits measured in the same run (memory read bandwidth, fp32 FMA
// peak of each instruction set, the AMX matrix unit's bf16 peak where the CPU
// has one), on the same in-memory store. Prints a table and the RATIO lines
// (docs/benchmarks.md); the headline is the instruction set the scan picks by
// itself (auto), the others are listed for comparison (an instruction set
// that auto already is, or that the CPU lacks, is skipped). The read
// bandwidth and the peak are measured once at the start and again just
// before each row's scans (column bw_GB/s); vs_bandwidth and vs_peak are
// against the latter. vs_peak is the useful fp32 multiply-adds (2Q per store
// value) over the FMA peak for the FMA paths, and the multiply-adds the
// matrix unit issues (padded to whole tiles: 16 query columns, 4 per query,
// and each fp16 value as two bf16 parts) over its bf16 peak for amx.
//
//   scan_bench [--n 200000] [--checkpoints 2] [--slots 6] [--dim 1024]
//              [--queries 1,8,32] [--k 10] [--reps 3] [--torch-reps 1]
//              [--isas auto,amx,avx512,avx2] [--dtype fp16|bf16]
// --dtype bf16 scans a bf16 store (the LibTorch way converts bf16 instead of
// fp16) and names its RATIO lines cpu_scan_bf16_*.
// --torch-reps 0 leaves the LibTorch way out (and RATIO cpu_scan_vs_libtorch).
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "bench/cpu_peak.h"
#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/scoring.h"

namespace rk = retrace::kernels;

namespace {

using retrace::bench::Now;
using retrace::bench::SplitMix;

struct Args {
  int64_t n = 200000;
  int32_t checkpoints = 2;
  int32_t slots = 6;
  int32_t dim = 1024;
  std::vector<int> queries = {1, 8, 32};
  int k = 10;
  int reps = 3;
  int torch_reps = 1;
  std::vector<std::string> isas = {"auto", "amx", "avx512", "avx2"};
  rk::DType dtype = rk::DType::kF16;
};

Args Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; i += 2) {
    std::string f = argv[i];
    // scripts/bench.sh passes Google Benchmark's flags to every binary.
    if (f.rfind("--benchmark_", 0) == 0) {
      --i;
      continue;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "flag %s needs a value\n", f.c_str());
      std::exit(2);
    }
    const char* v = argv[i + 1];
    if (f == "--n")
      a.n = std::atoll(v);
    else if (f == "--checkpoints")
      a.checkpoints = std::atoi(v);
    else if (f == "--slots")
      a.slots = std::atoi(v);
    else if (f == "--dim")
      a.dim = std::atoi(v);
    else if (f == "--k")
      a.k = std::atoi(v);
    else if (f == "--reps")
      a.reps = std::atoi(v);
    else if (f == "--torch-reps")
      a.torch_reps = std::atoi(v);
    else if (f == "--dtype") {
      if (!rk::ParseDType(v, &a.dtype) || a.dtype == rk::DType::kF32) {
        std::fprintf(stderr, "--dtype must be fp16 or bf16\n");
        std::exit(2);
      }
    } else if (f == "--isas") {
      a.isas.clear();
      for (const char* p = v; *p;) {
        const char* e = p;
        while (*e && *e != ',') ++e;
        a.isas.emplace_back(p, e);
        p = *e ? e + 1 : e;
      }
    } else if (f == "--queries") {
      a.queries.clear();
      for (const char* p = v; *p;) {
        a.queries.push_back(std::atoi(p));
        while (*p && *p != ',') ++p;
        if (*p == ',') ++p;
      }
    } else {
      std::fprintf(stderr, "unknown flag %s\n", f.c_str());
      std::exit(2);
    }
  }
  return a;
}

template <typename F>
void ParallelFor(int64_t n, int threads, F f) {
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([=] { f(n * t / threads, n * (t + 1) / threads); });
  }
  for (auto& th : pool) th.join();
}

struct TorchTopK {
  std::vector<int64_t> top_tracin, top_retrac;
};

// The LibTorch way: per block of rows, convert to fp32, one batched matmul of
// the [CS, rows, D] block with the [CS, D, 2Q] queries, weight, sum over the
// slots; then torch::topk over the [N, Q] scores.
TorchTopK TorchScan(const Args& a, const void* vectors, const float* norms,
                    const std::vector<float>& raw,
                    const std::vector<float>& unit, const std::vector<float>& w,
                    int q, int k) {
  torch::NoGradGuard no_grad;
  const int64_t cs = int64_t{a.checkpoints} * a.slots;
  auto store = torch::from_blob(
      const_cast<void*>(vectors), {a.n, cs, a.dim},
      a.dtype == rk::DType::kBF16 ? torch::kBFloat16 : torch::kHalf);
  auto norm_t =
      torch::from_blob(const_cast<float*>(norms), {a.n, cs}, torch::kFloat);
  auto qr = torch::from_blob(const_cast<float*>(raw.data()), {q, cs, a.dim},
                             torch::kFloat);
  auto qu = torch::from_blob(const_cast<float*>(unit.data()), {q, cs, a.dim},
                             torch::kFloat);
  auto wt =
      torch::from_blob(const_cast<float*>(w.data()), {q, cs}, torch::kFloat);
  auto qcat =
      torch::cat({qr, qu}, 0).permute({1, 2, 0}).contiguous();  // [CS, D, 2Q]
  auto weight = wt.t().unsqueeze(1);                            // [CS, 1, Q]
  auto scores_tr = torch::empty({a.n, q});
  auto scores_rt = torch::empty({a.n, q});
  constexpr int64_t kBlock = 1024;
  for (int64_t start = 0; start < a.n; start += kBlock) {
    const int64_t nb = std::min(kBlock, a.n - start);
    auto u = store.narrow(0, start, nb)
                 .to(torch::kFloat)
                 .transpose(0, 1);                            // [CS, nb, D]
    auto dots = torch::bmm(u, qcat);                          // [CS, nb, 2Q]
    auto nrm = norm_t.narrow(0, start, nb).t().unsqueeze(2);  // [CS, nb, 1]
    scores_tr.narrow(0, start, nb)
        .copy_((dots.narrow(2, 0, q) * nrm * weight).sum(0));
    scores_rt.narrow(0, start, nb)
        .copy_((dots.narrow(2, q, q) * weight).sum(0));
  }
  TorchTopK out;
  auto top_tr = std::get<1>(torch::topk(scores_tr, k, 0, true, true));
  auto top_rt = std::get<1>(torch::topk(scores_rt, k, 0, true, true));
  auto bottom_tr = torch::topk(scores_tr, k, 0, false, true);
  auto bottom_rt = torch::topk(scores_rt, k, 0, false, true);
  auto t0 = top_tr.select(1, 0).contiguous();
  auto t1 = top_rt.select(1, 0).contiguous();
  out.top_tracin.assign(t0.data_ptr<int64_t>(), t0.data_ptr<int64_t>() + k);
  out.top_retrac.assign(t1.data_ptr<int64_t>(), t1.data_ptr<int64_t>() + k);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = Parse(argc, argv);
  const int threads = rk::CpuThreads();
  at::set_num_threads(threads);
  const int64_t cs = int64_t{a.checkpoints} * a.slots;
  const int64_t row = cs * a.dim;
  const int64_t vec_bytes = a.n * row * 2;
  std::printf(
      "scan_bench: N=%lld C=%d S=%d D=%d %s, store %.2f GB, %d threads, "
      "k=%d\n",
      static_cast<long long>(a.n), a.checkpoints, a.slots, a.dim,
      rk::DTypeName(a.dtype), vec_bytes / 1e9, threads, a.k);
  std::fflush(stdout);

  std::unique_ptr<uint16_t[]> vectors(new uint16_t[a.n * row]);
  std::unique_ptr<float[]> norms(new float[a.n * cs]);
  const float inv_sqrt_d = 1.0f / std::sqrt(float(a.dim));
  ParallelFor(a.n, threads, [&](int64_t b, int64_t e) {
    for (int64_t i = b * row; i < e * row; ++i) {
      const uint64_t h = SplitMix(i);
      const float u =
          (int64_t(h >> 40) - (1 << 23)) / float(1 << 23);  // [-1, 1)
      vectors[i] = a.dtype == rk::DType::kBF16
                       ? rk::FloatToBf16(u * 1.7f * inv_sqrt_d)
                       : rk::FloatToHalf(u * 1.7f * inv_sqrt_d);
    }
    for (int64_t i = b * cs; i < e * cs; ++i) {
      norms[i] = 0.1f + (SplitMix(i ^ 0xabcdef) >> 40) / float(1 << 22);
    }
  });

  const double bandwidth =
      retrace::bench::ReadBandwidth(vectors.get(), vec_bytes, threads);
  std::printf("memory read bandwidth: %.2f GB/s (%d threads)\n",
              bandwidth / 1e9, threads);
  // The FMA peak of each width this CPU has, all threads at once.
  const double peak8 = retrace::bench::FmaPeak(8, threads);
  const double peak16 = retrace::bench::FmaPeak(16, threads);
  std::printf("fp32 FMA peak: avx2 %.1f GFMA/s, avx512 %.1f GFMA/s\n",
              peak8 / 1e9, peak16 / 1e9);
  const double amx_peak = retrace::bench::AmxPeak(threads);
  if (amx_peak > 0) {
    std::printf("AMX bf16 peak: %.1f GMAC/s\n", amx_peak / 1e9);
  }
  std::fflush(stdout);

  rk::StoreLayout layout{a.dtype, a.checkpoints, a.slots, a.dim};
  std::vector<rk::StoreChunk> chunks = {{vectors.get(), norms.get(), a.n, 0}};

  std::printf("%8s %4s %10s %12s %10s %8s %9s %12s %12s %12s %10s\n", "isa",
              "Q", "scan_ms", "libtorch_ms", "scan_GB/s", "bw_GB/s", "GFMA/s",
              "vs_libtorch", "vs_bandwidth", "vs_peak", "top_agree");
  double worst_vs_torch = 1e30, q1_vs_bandwidth = -1, q32_vs_bandwidth = -1,
         q32_vs_fma_peak = -1, q32_vs_amx_peak = -1;
  std::vector<rk::CpuIsa> measured;
  for (size_t ii = 0; ii < a.isas.size(); ++ii) {
    rk::CpuIsa requested = rk::CpuIsa::kAuto;
    if (!rk::ParseCpuIsa(a.isas[ii], &requested)) {
      std::fprintf(stderr, "unknown instruction set %s\n", a.isas[ii].c_str());
      return 2;
    }
    rk::CpuIsa isa = rk::CpuIsa::kScalar;
    const rk::KernelStatus resolved =
        rk::ChooseCpuScanIsa(requested, a.dtype, &isa);
    if (!resolved.ok()) {
      std::printf("%8s: skipped (%s)\n", a.isas[ii].c_str(),
                  resolved.ToString().c_str());
      continue;
    }
    if (std::find(measured.begin(), measured.end(), isa) != measured.end()) {
      continue;  // auto already is this one
    }
    measured.push_back(isa);
    const bool headline = ii == 0;  // the first listed (auto by default)
    const std::string label = requested == rk::CpuIsa::kAuto
                                  ? std::string("auto=") + rk::CpuIsaName(isa)
                                  : rk::CpuIsaName(isa);
    // The FMA width of this instruction set's chains (none for scalar and
    // the matrix unit).
    const int lanes = isa == rk::CpuIsa::kAvx512 ? 16
                      : isa == rk::CpuIsa::kAvx2 ? 8
                                                 : 0;
    const bool amx = isa == rk::CpuIsa::kAmx;
    for (int q : a.queries) {
      std::vector<float> raw(q * row), unit(q * row), w(q * cs, 1.0f);
      for (int64_t i = 0; i < q * row; ++i) {
        raw[i] =
            (int64_t(SplitMix(i + 7777) >> 40) - (1 << 23)) / float(1 << 23);
        unit[i] =
            (int64_t(SplitMix(i + 9999) >> 40) - (1 << 23)) / float(1 << 23);
      }
      rk::QueryBatch batch{q, raw.data(), unit.data(), w.data(), w.data()};
      rk::ScanOptions opt;
      opt.k = a.k;
      opt.want_bottom = true;
      opt.isa = requested;
      rk::ScanResult result;
      // The read bandwidth and the FMA peak again just before this row's
      // scans: on a shared machine they drift by half between minutes, so
      // each row's ratios are against the limits of its own moment.
      const double row_bandwidth =
          retrace::bench::ReadBandwidth(vectors.get(), vec_bytes, threads);
      const double row_peak = lanes > 0
                                  ? retrace::bench::FmaPeak(lanes, threads)
                              : amx ? retrace::bench::AmxPeak(threads)
                                    : 0.0;
      double t_scan = 1e30;
      for (int rep = 0; rep < a.reps; ++rep) {
        double t0 = Now();
        rk::KernelStatus s = rk::ScanCpu(layout, chunks, batch, opt, &result);
        t_scan = std::min(t_scan, Now() - t0);
        if (!s.ok()) {
          std::fprintf(stderr, "scan failed: %s\n", s.ToString().c_str());
          return 1;
        }
      }
      const double gbps = vec_bytes / t_scan / 1e9;
      const double fmas = 2.0 * q * double(a.n) * double(row);
      const double gfma = fmas / t_scan / 1e9;
      // What the matrix unit issues: d padded to whole 32-value steps, 4
      // columns per query padded to whole 16-column tiles, two bf16 parts
      // per fp16 value.
      const double amx_macs = double(a.n) * double(cs) *
                              double((a.dim + 31) / 32 * 32) *
                              double((4 * q + 15) / 16 * 16) *
                              (a.dtype == rk::DType::kF16 ? 2.0 : 1.0);
      const double vs_bw = (vec_bytes / t_scan) / row_bandwidth;
      const double vs_peak =
          row_peak <= 0 ? 0.0 : (amx ? amx_macs : fmas) / t_scan / row_peak;
      if (headline) {
        if (q == 1) q1_vs_bandwidth = vs_bw;
        if (q == 32) q32_vs_bandwidth = vs_bw;
      }
      if (q == 32 && amx && headline) q32_vs_amx_peak = vs_peak;
      // The widest FMA path measured (the headline, or the first listed
      // after a matrix-unit headline).
      if (q == 32 && lanes > 0 && q32_vs_fma_peak < 0) {
        q32_vs_fma_peak = vs_peak;
      }
      if (!headline || a.torch_reps < 1) {
        std::printf(
            "%8s %4d %10.1f %12s %10.2f %8.2f %9.1f %12s %12.2f %12.2f %10s\n",
            label.c_str(), q, t_scan * 1e3, "-", gbps, row_bandwidth / 1e9,
            gfma, "-", vs_bw, vs_peak, "-");
        std::fflush(stdout);
        continue;
      }
      double t_torch = 1e30;
      TorchTopK ref;
      for (int rep = 0; rep < a.torch_reps; ++rep) {
        double t0 = Now();
        ref = TorchScan(a, vectors.get(), norms.get(), raw, unit, w, q, a.k);
        t_torch = std::min(t_torch, Now() - t0);
      }
      // Both compute the same scores in fp32 with different summation
      // orders: the top lists should agree up to near-ties.
      int agree = 0;
      for (int j = 0; j < a.k; ++j) {
        agree += result.Get(0, rk::Method::kTracIn).top[j].index ==
                 ref.top_tracin[j];
        agree += result.Get(0, rk::Method::kReTrac).top[j].index ==
                 ref.top_retrac[j];
      }
      const double vs_torch = t_torch / t_scan;
      std::printf(
          "%8s %4d %10.1f %12.1f %10.2f %8.2f %9.1f %12.2f %12.2f %12.2f "
          "%7d/%d\n",
          label.c_str(), q, t_scan * 1e3, t_torch * 1e3, gbps,
          row_bandwidth / 1e9, gfma, vs_torch, vs_bw, vs_peak, agree, 2 * a.k);
      std::fflush(stdout);
      worst_vs_torch = std::min(worst_vs_torch, vs_torch);
    }
  }
  const char* name = a.dtype == rk::DType::kBF16 ? "cpu_scan_bf16" : "cpu_scan";
  if (worst_vs_torch < 1e30)
    std::printf("RATIO %s_vs_libtorch %.2f\n", name, worst_vs_torch);
  if (q1_vs_bandwidth >= 0)
    std::printf("RATIO %s_vs_bandwidth %.2f\n", name, q1_vs_bandwidth);
  if (q32_vs_bandwidth >= 0) {
    std::printf("RATIO %s_q32_vs_bandwidth %.2f\n", name, q32_vs_bandwidth);
  }
  if (q32_vs_fma_peak > 0)
    std::printf("RATIO %s_q32_vs_fma_peak %.2f\n", name, q32_vs_fma_peak);
  if (q32_vs_amx_peak > 0)
    std::printf("RATIO %s_q32_vs_amx_peak %.2f\n", name, q32_vs_amx_peak);
  return 0;
}
