// GPU scan benchmark (scripts/bench.sh scan, on a machine with a CUDA
// device): the fused TracIn + ReTrac scan of a store of >= 8 GB fp16,
// generated on the device, for Q in {1, 8, 32, 128} and k in {10, 100,
// 4096}, against
//   - the device's measured copy bandwidth (cudaMemcpy device to device of a
//     large buffer; bytes read plus bytes written per second, the DRAM
//     traffic that a read-only scan can at best match);
//   - the PyTorch way on the same data and shapes, in the same run
//     (bench/scan_torch.py, run with the machine's python3: torch.bmm per
//     block of rows, torch.topk; fp32 and fp16-matmul variants);
//   - the CPU backend, whose top and bottom lists must agree with the GPU's
//     on the first --subsample rows (exit status 1 when they do not).
// It also times the SJLT and dense projections on CUDA at p = 1e7 (the
// settings of bench/projection_bench.cc). Q above kernels::kMaxQueries runs
// as consecutive batches of at most kMaxQueries queries, and its time is
// their sum (the table says how many).
//
// RATIO lines (docs/benchmarks.md):
//   gpu_scan_vs_d2d          worst over Q = 1, 8, 32 at the smallest k of
//                            (store bytes / scan time) / copy bandwidth
//   gpu_scan_vs_torch        worst over every (Q, k) of the faster PyTorch
//                            variant's time / the scan's time
//   sjlt_vs_dense_p1e7_cuda  dense time / SJLT time, p = 1e7, D = 1024, B = 1
// Without a device (or in a build without CUDA) it prints why and a
// "# <ratio> not measured" line per ratio, and exits 0.
//
// --cpu-rehearsal runs the same flow with the CPU backend on a store
// generated on the host and bench/scan_torch.py on the CPU (fp32 variant), and
// exits 1 unless the data checksums and the top and bottom lists agree: it
// checks, without a GPU, that the PyTorch script builds the same data and
// computes the same scores as the scan.
//
//   scan_gpu_bench [--n 1048576] [--checkpoints 2] [--slots 6] [--dim 512]
//                  [--queries 1,8,32,128] [--k 10,100,4096] [--reps 3]
//                  [--subsample 100000] [--python python3]
//                  [--torch-script bench/scan_torch.py] [--no-torch]
//                  [--no-projection] [--cpu-rehearsal]
//                  [--cuda-path auto|fp32|tensor-core]
// The scan runs with --cuda-path (kernels::ChooseCudaScanPath's choice under
// auto); when that is not the fp32 path, the fp32 path is also timed at the
// smallest k, for comparison (column fp32path_ms).
// The Python interpreter may also be set with RETRACE_BENCH_PYTHON.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "bench/bench_util.h"
#include "bench/synthetic_store.h"
#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/projection.h"
#include "kernels/scoring.h"

#ifdef RETRACE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace rk = retrace::kernels;
namespace rb = retrace::bench;

namespace {

constexpr char kRatioD2d[] = "gpu_scan_vs_d2d";
constexpr char kRatioTorch[] = "gpu_scan_vs_torch";
constexpr char kRatioProjection[] = "sjlt_vs_dense_p1e7_cuda";
// GPU and CPU scores of one rank may differ by this fraction of the list's
// largest |score|: fp32 summation order, or a tensor-core path with
// fp16-rounded queries (about 2^-11 relative per product).
constexpr double kAgreementRelTol = 2e-3;
// Entries of each list that the PyTorch script prints and that are compared.
constexpr int kTorchTopOut = 10;

std::vector<int> ParseList(const char* v) {
  std::vector<int> out;
  for (const char* p = v; *p;) {
    out.push_back(std::atoi(p));
    while (*p && *p != ',') ++p;
    if (*p == ',') ++p;
  }
  return out;
}

struct Args {
  int64_t n = int64_t{1} << 20;  // 12.9 GB of fp16 at C = 2, S = 6, D = 512
  int32_t checkpoints = 2;
  int32_t slots = 6;
  int32_t dim = 512;
  std::vector<int> queries = {1, 8, 32, 128};
  std::vector<int> ks = {10, 100, 4096};
  int reps = 3;
  int64_t subsample = 100000;
  std::string python = "python3";
  std::string torch_script;
  bool torch = true;
  bool projection = true;
  bool cpu_rehearsal = false;
  rk::CudaScanPath cuda_path = rk::CudaScanPath::kAuto;
};

Args Parse(int argc, char** argv) {
  Args a;
  if (const char* py = std::getenv("RETRACE_BENCH_PYTHON"); py && *py)
    a.python = py;
  const char* src = std::getenv("RETRACE_SOURCE_DIR");
  a.torch_script = std::string(src && *src ? src : RETRACE_BENCH_SOURCE_DIR) +
                   "/bench/scan_torch.py";
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i];
    // scripts/bench.sh passes Google Benchmark's flags to every binary.
    if (f.rfind("--benchmark_", 0) == 0) continue;
    if (f == "--no-torch") {
      a.torch = false;
      continue;
    }
    if (f == "--no-projection") {
      a.projection = false;
      continue;
    }
    if (f == "--cpu-rehearsal") {
      a.cpu_rehearsal = true;
      continue;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "flag %s needs a value\n", f.c_str());
      std::exit(2);
    }
    const char* v = argv[++i];
    if (f == "--n")
      a.n = std::atoll(v);
    else if (f == "--checkpoints")
      a.checkpoints = std::atoi(v);
    else if (f == "--slots")
      a.slots = std::atoi(v);
    else if (f == "--dim")
      a.dim = std::atoi(v);
    else if (f == "--queries")
      a.queries = ParseList(v);
    else if (f == "--k")
      a.ks = ParseList(v);
    else if (f == "--reps")
      a.reps = std::max(1, std::atoi(v));
    else if (f == "--subsample")
      a.subsample = std::atoll(v);
    else if (f == "--python")
      a.python = v;
    else if (f == "--torch-script")
      a.torch_script = v;
    else if (f == "--torch-reps")  // scan_bench's flag, same command line
      continue;
    else if (f == "--cuda-path") {
      const std::string p = v;
      if (p == "auto") {
        a.cuda_path = rk::CudaScanPath::kAuto;
      } else if (p == "fp32") {
        a.cuda_path = rk::CudaScanPath::kFp32;
      } else if (p == "tensor-core") {
        a.cuda_path = rk::CudaScanPath::kTensorCore;
      } else {
        std::fprintf(stderr, "--cuda-path: auto, fp32 or tensor-core\n");
        std::exit(2);
      }
    } else {
      std::fprintf(stderr, "unknown flag %s\n", f.c_str());
      std::exit(2);
    }
  }
  if (a.n < 1 || a.checkpoints < 1 || a.slots < 1 || a.dim < 1 ||
      a.queries.empty() || a.ks.empty()) {
    std::fprintf(stderr, "sizes, --queries and --k must be positive\n");
    std::exit(2);
  }
  for (int q : a.queries) {
    if (q < 1) {
      std::fprintf(stderr, "--queries: %d is not positive\n", q);
      std::exit(2);
    }
  }
  for (int k : a.ks) {
    if (k < 1 || k > rk::kMaxTopK || k > a.n) {
      std::fprintf(stderr, "--k: %d is outside 1..min(%d, N)\n", k,
                   rk::kMaxTopK);
      std::exit(2);
    }
  }
  std::sort(a.ks.begin(), a.ks.end());
  a.subsample = std::clamp<int64_t>(a.subsample, a.ks.back(), a.n);
  return a;
}

void PrintNotMeasured(const char* ratio, const std::string& why) {
  std::printf("# %s not measured (%s)\n", ratio, why.c_str());
}

// The queries of bench/synthetic_store.h for global queries [0, q_max).
struct HostQueries {
  std::vector<float> raw, unit, tracin, retrac;
};

HostQueries MakeQueries(int q_max, int64_t slot_pairs, int64_t row) {
  HostQueries h;
  h.raw.resize(size_t(q_max * row));
  h.unit.resize(h.raw.size());
  for (size_t i = 0; i < h.raw.size(); ++i) {
    h.raw[i] = rb::SyntheticUniform(i, rb::kSeedRaw);
    h.unit[i] = rb::SyntheticUniform(i, rb::kSeedUnit);
  }
  h.tracin.resize(size_t(q_max * slot_pairs));
  h.retrac.resize(h.tracin.size());
  for (size_t i = 0; i < h.tracin.size(); ++i) {
    h.tracin[i] = rb::SyntheticWeight(i, rb::kSeedTracinWeights);
    h.retrac[i] = rb::SyntheticWeight(i, rb::kSeedRetracWeights);
  }
  return h;
}

// The host twin of FillSyntheticStoreCuda, on every core.
void FillHost(uint16_t* vectors, float* norms, int64_t rows, int64_t slot_pairs,
              int64_t row) {
  const int threads = rk::CpuThreads();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([=] {
      const int64_t b = rows * t / threads, e = rows * (t + 1) / threads;
      for (int64_t i = b * row; i < e * row; ++i) {
        vectors[i] = rk::FloatToHalf(
            rb::SyntheticUniform(uint64_t(i), rb::kSeedVectors) *
            rb::kVectorScale);
      }
      for (int64_t i = b * slot_pairs; i < e * slot_pairs; ++i) {
        norms[i] = rb::SyntheticNorm(uint64_t(i));
      }
    });
  }
  for (auto& th : pool) th.join();
}

// One batch of at most kMaxQueries consecutive queries.
struct Batch {
  int first, count;
};

std::vector<Batch> Batches(int q) {
  std::vector<Batch> out;
  for (int q0 = 0; q0 < q; q0 += rk::kMaxQueries)
    out.push_back({q0, std::min(rk::kMaxQueries, q - q0)});
  return out;
}

// ---- the PyTorch side
// --------------------------------------------------------

struct TorchTime {
  double scores_ms = -1, topk_ms = -1, total_ms = -1;
};

struct TorchTop {
  std::vector<int64_t> indices;
  std::vector<double> scores;
};

// (q, k, variant) and (q, k, variant, query, method, list).
using TimeKey = std::tuple<int, int, std::string>;
using TopKey = std::tuple<int, int, std::string, int, std::string, std::string>;

struct TorchRun {
  std::string error;  // empty when the script ran
  std::string info;
  bool have_checksum = false;
  unsigned long long checksum_vectors = 0, checksum_norms = 0;
  std::map<TimeKey, TorchTime> times;
  std::map<TopKey, TorchTop> tops;
};

// The value of " key=" in line, or "".
std::string Field(const std::string& line, const std::string& key) {
  const std::string pat = " " + key + "=";
  size_t at = line.find(pat);
  if (at == std::string::npos) return "";
  at += pat.size();
  return line.substr(at, line.find(' ', at) - at);
}

template <typename T>
std::vector<T> CsvList(const std::string& s) {
  std::vector<T> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(T(std::strtod(item.c_str(), nullptr)));
  return out;
}

std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

std::string JoinInts(const std::vector<int>& v) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i)
    out += (i ? "," : "") + std::to_string(v[i]);
  return out;
}

TorchRun RunTorch(const Args& a, const char* device, const char* variants) {
  TorchRun run;
  const std::string cmd =
      ShellQuote(a.python) + " " + ShellQuote(a.torch_script) + " --n " +
      std::to_string(a.n) + " --checkpoints " + std::to_string(a.checkpoints) +
      " --slots " + std::to_string(a.slots) + " --dim " +
      std::to_string(a.dim) + " --queries " + JoinInts(a.queries) + " --k " +
      JoinInts(a.ks) + " --reps " + std::to_string(a.reps) + " --variants " +
      variants + " --device " + device + " --top-out " +
      std::to_string(kTorchTopOut);
  std::printf("pytorch: %s\n", cmd.c_str());
  std::fflush(stdout);
  FILE* pipe = popen(cmd.c_str(), "r");
  if (!pipe) {
    run.error = "could not start " + a.python;
    return run;
  }
  char buf[1 << 16];
  while (std::fgets(buf, sizeof buf, pipe)) {
    std::string line(buf);
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r'))
      line.pop_back();
    const std::string tag = line.substr(0, line.find(' '));
    line += " ";  // every field ends with a space
    if (tag == "TORCH_TOP") {
      TopKey key{std::atoi(Field(line, "q").c_str()),
                 std::atoi(Field(line, "k").c_str()),
                 Field(line, "variant"),
                 std::atoi(Field(line, "query").c_str()),
                 Field(line, "method"),
                 Field(line, "list")};
      run.tops[key] = {CsvList<int64_t>(Field(line, "indices")),
                       CsvList<double>(Field(line, "scores"))};
      continue;
    }
    std::printf("  %s\n", line.c_str());
    if (tag == "TORCH_INFO") {
      run.info = line.substr(11);
    } else if (tag == "TORCH_CHECKSUM") {
      run.have_checksum = true;
      run.checksum_vectors =
          std::strtoull(Field(line, "vectors").c_str(), nullptr, 10);
      run.checksum_norms =
          std::strtoull(Field(line, "norms").c_str(), nullptr, 10);
    } else if (tag == "TORCH_TIME") {
      TimeKey key{std::atoi(Field(line, "q").c_str()),
                  std::atoi(Field(line, "k").c_str()), Field(line, "variant")};
      run.times[key] = {std::atof(Field(line, "scores_ms").c_str()),
                        std::atof(Field(line, "topk_ms").c_str()),
                        std::atof(Field(line, "total_ms").c_str())};
    } else if (tag == "TORCH_ERROR") {
      run.error = line.substr(12);
    }
  }
  const int status = pclose(pipe);
  if (run.error.empty() && status != 0)
    run.error = "the PyTorch script exited with status " +
                std::to_string(status) + " (its stderr is above)";
  std::fflush(stdout);
  return run;
}

// Fastest PyTorch variant for (q, k), in ms; < 0 when none ran.
double TorchBestMs(const TorchRun& run, int q, int k, std::string* variant) {
  double best = -1;
  for (const char* v : {"fp32", "fp16"}) {
    auto it = run.times.find(TimeKey{q, k, v});
    if (it == run.times.end() || it->second.total_ms <= 0) continue;
    if (best < 0 || it->second.total_ms < best) {
      best = it->second.total_ms;
      if (variant) *variant = v;
    }
  }
  return best;
}

const char* MethodName(rk::Method m) {
  return m == rk::Method::kTracIn ? "tracin" : "retrac";
}

// Agreement of ranked lists: rank by rank, scores within tolerance, no
// repeated index, and an index that differs from the reference's at the same
// rank must be a near tie (its reference score, where the reference list
// holds it, within tolerance).
struct Agreement {
  int64_t entries = 0, same_index = 0, bad = 0;
  double max_abs_diff = 0;
  std::string first_bad;

  void Add(const std::vector<rk::ScoredSample>& got,
           const std::vector<rk::ScoredSample>& want_full, int k,
           bool reference_is_exactly_k, const std::string& where) {
    double scale = 0;
    for (const auto& w : want_full)
      scale = std::max(scale, double(std::fabs(w.score)));
    const double tol = kAgreementRelTol * scale + 1e-6;
    std::map<int64_t, float> want_score;
    for (const auto& s : want_full) want_score[s.index] = s.score;
    std::set<int64_t> seen;
    auto fail = [&](const std::string& what) {
      if (bad++ == 0) first_bad = where + ": " + what;
    };
    if (int(got.size()) < k || int(want_full.size()) < k) {
      fail("list shorter than k");
      return;
    }
    for (int j = 0; j < k; ++j) {
      ++entries;
      const auto& g = got[j];
      const auto& w = want_full[j];
      const double diff = std::fabs(double(g.score) - double(w.score));
      max_abs_diff = std::max(max_abs_diff, diff);
      if (!seen.insert(g.index).second)
        fail("index " + std::to_string(g.index) + " repeated");
      if (diff > tol)
        fail("rank " + std::to_string(j) + " score " + std::to_string(g.score) +
             " vs " + std::to_string(w.score));
      if (g.index == w.index) {
        ++same_index;
        continue;
      }
      auto it = want_score.find(g.index);
      if (it != want_score.end()) {
        if (std::fabs(double(it->second) - g.score) > tol)
          fail("index " + std::to_string(g.index) + " scored " +
               std::to_string(g.score) + " vs " + std::to_string(it->second));
      } else if (!reference_is_exactly_k) {
        // The reference list is longer than k: a sample it does not hold
        // cannot be in the top k.
        fail("index " + std::to_string(g.index) + " at rank " +
             std::to_string(j) + " is not in the reference list");
      }
    }
  }
};

// Compares the first entries of the scan's lists of queries 0 and q-1 with
// the PyTorch ones; returns "matched/compared" and adds to *agreement.
std::string CompareWithTorch(const TorchRun& run, int q, int k,
                             const std::string& variant,
                             const std::vector<rk::ScanResult>& results,
                             const std::vector<Batch>& batches,
                             Agreement* agreement) {
  int64_t matched = 0, compared = 0;
  for (int query : std::set<int>{0, q - 1}) {
    const Batch* b = nullptr;
    for (const Batch& bb : batches)
      if (query >= bb.first && query < bb.first + bb.count) b = &bb;
    const rk::ScanResult& r = results[size_t(b - batches.data())];
    for (rk::Method m : {rk::Method::kTracIn, rk::Method::kReTrac}) {
      for (bool top : {true, false}) {
        auto it = run.tops.find(TopKey{q, k, variant, query, MethodName(m),
                                       top ? "top" : "bottom"});
        if (it == run.tops.end()) continue;
        const rk::RankedList& list = r.Get(query - b->first, m);
        const std::vector<rk::ScoredSample>& ours =
            top ? list.top : list.bottom;
        std::vector<rk::ScoredSample> theirs;
        for (size_t j = 0; j < it->second.indices.size(); ++j)
          theirs.push_back(
              {it->second.indices[j], float(it->second.scores[j]), {}});
        const int m_cmp = int(std::min(theirs.size(), ours.size()));
        for (int j = 0; j < m_cmp; ++j) {
          ++compared;
          matched += ours[j].index == theirs[j].index;
        }
        if (agreement) {
          agreement->Add(ours, theirs, m_cmp, /*reference_is_exactly_k=*/true,
                         "pytorch q=" + std::to_string(q) +
                             " k=" + std::to_string(k) + " query " +
                             std::to_string(query) + " " + MethodName(m) +
                             (top ? " top" : " bottom"));
        }
      }
    }
  }
  return std::to_string(matched) + "/" + std::to_string(compared);
}

void AddAgreement(const rk::ScanResult& got, const rk::ScanResult& want, int k,
                  int want_k, const std::string& where, Agreement* agreement) {
  for (size_t q = 0; q < got.per_query.size(); ++q) {
    for (rk::Method m : {rk::Method::kTracIn, rk::Method::kReTrac}) {
      const rk::RankedList& g = got.Get(int(q), m);
      const rk::RankedList& w = want.Get(int(q), m);
      const std::string at =
          where + " query " + std::to_string(q) + " " + MethodName(m);
      agreement->Add(g.top, w.top, k, want_k == k, at + " top");
      agreement->Add(g.bottom, w.bottom, k, want_k == k, at + " bottom");
    }
  }
}

std::string AgreementText(const Agreement& a) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "%lld/%lld%s", (long long)a.same_index,
                (long long)a.entries, a.bad ? " FAIL" : "");
  return buf;
}

// ---- CPU rehearsal
// -------------------------------------------------------------

int CpuRehearsal(const Args& a) {
  const int64_t cs = int64_t{a.checkpoints} * a.slots;
  const int64_t row = cs * a.dim;
  std::printf(
      "scan_gpu_bench --cpu-rehearsal: N=%lld C=%d S=%d D=%d fp16 on the host, "
      "CPU backend and PyTorch on the CPU\n",
      (long long)a.n, a.checkpoints, a.slots, a.dim);
  std::vector<uint16_t> vectors(size_t(a.n * row));
  std::vector<float> norms(size_t(a.n * cs));
  FillHost(vectors.data(), norms.data(), a.n, cs, row);
  unsigned long long sum_v = 0, sum_n = 0;
  for (uint16_t v : vectors) sum_v += v;
  for (float f : norms) sum_n += rk::FloatBits(f);
  const int q_max = *std::max_element(a.queries.begin(), a.queries.end());
  const HostQueries hq = MakeQueries(q_max, cs, row);

  TorchRun torch = RunTorch(a, "cpu", "fp32");
  if (torch.error.rfind("cannot import torch", 0) == 0) {
    std::printf("rehearsal skipped: %s\n", torch.error.c_str());
    return 77;  // CTest's SKIP_RETURN_CODE
  }
  if (!torch.error.empty()) {
    std::printf("rehearsal FAILED: %s\n", torch.error.c_str());
    return 1;
  }
  int failures = 0;
  if (!torch.have_checksum || torch.checksum_vectors != sum_v ||
      torch.checksum_norms != sum_n) {
    std::printf("data checksums differ: C++ vectors=%llu norms=%llu\n", sum_v,
                sum_n);
    ++failures;
  } else {
    std::printf("data checksums agree: vectors=%llu norms=%llu\n", sum_v,
                sum_n);
  }
  const rk::StoreLayout layout{rk::DType::kF16, a.checkpoints, a.slots, a.dim};
  const std::vector<rk::StoreChunk> chunks = {
      {vectors.data(), norms.data(), a.n, 0}};
  Agreement agreement;
  for (int q : a.queries) {
    for (int k : a.ks) {
      std::vector<Batch> batches = Batches(q);
      std::vector<rk::ScanResult> results(batches.size());
      for (size_t b = 0; b < batches.size(); ++b) {
        const int64_t qo = batches[b].first;
        rk::QueryBatch batch{batches[b].count, hq.raw.data() + qo * row,
                             hq.unit.data() + qo * row,
                             hq.tracin.data() + qo * cs,
                             hq.retrac.data() + qo * cs};
        rk::ScanOptions opt;
        opt.k = k;
        rk::KernelStatus s =
            rk::ScanCpu(layout, chunks, batch, opt, &results[b]);
        if (!s.ok()) {
          std::printf("ScanCpu failed: %s\n", s.ToString().c_str());
          return 1;
        }
      }
      const std::string text =
          CompareWithTorch(torch, q, k, "fp32", results, batches, &agreement);
      std::printf("Q=%d k=%d batches=%zu: CPU scan vs PyTorch %s\n", q, k,
                  batches.size(), text.c_str());
    }
  }
  if (agreement.bad) {
    std::printf("lists disagree (%lld entries): %s\n", (long long)agreement.bad,
                agreement.first_bad.c_str());
    ++failures;
  }
  std::printf("max |score difference| %.3g over %lld entries\n",
              agreement.max_abs_diff, (long long)agreement.entries);
  std::printf("rehearsal %s\n", failures ? "FAILED" : "passed");
  return failures ? 1 : 0;
}

// ---- GPU
// -----------------------------------------------------------------------

#ifdef RETRACE_HAVE_CUDA

bool CudaOk(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "scan_gpu_bench: %s: %s\n", what, cudaGetErrorString(e));
  std::printf("CUDA error in %s: %s\n", what, cudaGetErrorString(e));
  return false;
}

// Owns one device allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Reset(); }
  bool Allocate(size_t bytes, const char* what) {
    Reset();
    return CudaOk(cudaMalloc(&ptr_, std::max<size_t>(bytes, 1)), what);
  }
  void Reset() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
};

// Copy bandwidth: cudaMemcpy device to device of `bytes`, best of 5 after a
// warm-up, as (bytes read + bytes written) / time.
bool MeasureD2d(size_t bytes, double* bytes_per_s) {
  DeviceBuffer src, dst;
  if (!src.Allocate(bytes, "cudaMalloc (copy source)") ||
      !dst.Allocate(bytes, "cudaMalloc (copy destination)") ||
      !CudaOk(cudaMemset(src.as<void>(), 1, bytes), "cudaMemset"))
    return false;
  cudaEvent_t start, stop;
  if (!CudaOk(cudaEventCreate(&start), "cudaEventCreate") ||
      !CudaOk(cudaEventCreate(&stop), "cudaEventCreate"))
    return false;
  float best_ms = 1e30f;
  bool ok = true;
  for (int rep = 0; ok && rep < 6; ++rep) {
    ok = CudaOk(cudaEventRecord(start), "cudaEventRecord") &&
         CudaOk(cudaMemcpy(dst.as<void>(), src.as<void>(), bytes,
                           cudaMemcpyDeviceToDevice),
                "cudaMemcpy device to device") &&
         CudaOk(cudaEventRecord(stop), "cudaEventRecord") &&
         CudaOk(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0;
    if (ok) ok = CudaOk(cudaEventElapsedTime(&ms, start, stop), "elapsed");
    if (ok && rep > 0) best_ms = std::min(best_ms, ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  *bytes_per_s = 2.0 * double(bytes) / (best_ms * 1e-3);
  return ok;
}

// Mean seconds of one whole projection of a p-vector on CUDA (Reset, pieces
// of 2^22 coordinates, Finalize), as bench/projection_bench.cc runs it.
double TimeProjectionCuda(rk::ProjectionType type, int64_t p,
                          std::string* err) {
  constexpr int64_t kPiece = int64_t{1} << 22;
  rk::ProjectionSpec spec;
  spec.type = type;
  spec.output_dim = 1024;
  spec.sparsity = 4;
  spec.seed = 2026;
  spec.input_dim = p;
  const int64_t piece = std::min(p, kPiece);
  std::vector<float> host(static_cast<size_t>(piece));
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f,
                                         float(1.0 / std::sqrt(double(p))));
  for (float& v : host) v = normal(rng);
  DeviceBuffer values, out;
  if (!values.Allocate(host.size() * sizeof(float),
                       "cudaMalloc (projection)") ||
      !out.Allocate(spec.output_dim * sizeof(float),
                    "cudaMalloc (projection)") ||
      !CudaOk(cudaMemcpy(values.as<void>(), host.data(),
                         host.size() * sizeof(float), cudaMemcpyHostToDevice),
              "cudaMemcpy (projection)")) {
    *err = "CUDA set-up failed";
    return -1;
  }
  cudaStream_t stream;
  if (!CudaOk(cudaStreamCreate(&stream), "cudaStreamCreate")) {
    *err = "cudaStreamCreate failed";
    return -1;
  }
  std::unique_ptr<rk::Projector> projector;
  rk::KernelStatus s =
      rk::Projector::Create(spec, 1, rk::Backend::kCuda, stream, &projector);
  auto once = [&] {
    s = projector->Reset();
    for (int64_t at = 0; s.ok() && at < p; at += piece)
      s = projector->Accumulate(values.as<float>(), std::min(piece, p - at),
                                piece, at);
    if (s.ok()) s = projector->Finalize(out.as<float>());
  };
  double seconds = -1;
  if (s.ok()) {
    once();  // warm-up
    int iterations = 0;
    const double t0 = rb::Now();
    while (s.ok() && (iterations < 3 || rb::Now() - t0 < 0.3)) {
      once();
      ++iterations;
    }
    if (s.ok()) seconds = (rb::Now() - t0) / iterations;
  }
  if (!s.ok()) *err = s.ToString();
  projector.reset();
  cudaStreamDestroy(stream);
  return seconds;
}

int GpuBench(const Args& a) {
  int device = 0;
  cudaDeviceProp prop;
  if (!CudaOk(cudaGetDevice(&device), "cudaGetDevice") ||
      !CudaOk(cudaGetDeviceProperties(&prop, device),
              "cudaGetDeviceProperties"))
    return 1;
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  size_t free_bytes = 0, total_bytes = 0;
  cudaMemGetInfo(&free_bytes, &total_bytes);
  std::printf(
      "device: %s, sm_%d%d, %d SMs, %.1f GB (%.1f GB free), L2 %d MB, "
      "driver CUDA %d.%d, runtime %d.%d\n",
      prop.name, prop.major, prop.minor, prop.multiProcessorCount,
      total_bytes / 1e9, free_bytes / 1e9, prop.l2CacheSize >> 20,
      driver / 1000, driver % 1000 / 10, runtime / 1000, runtime % 1000 / 10);
  std::fflush(stdout);
  int failures = 0;

  // Copy bandwidth first, while the device memory is free.
  double d2d = -1;
  const size_t copy_bytes =
      std::min<size_t>(size_t{4} << 30, free_bytes / 4 / 256 * 256);
  if (MeasureD2d(copy_bytes, &d2d)) {
    std::printf(
        "device-to-device copy: %.2f GB copied, %.1f GB/s (read + written)\n",
        copy_bytes / 1e9, d2d / 1e9);
  } else {
    d2d = -1;
    ++failures;
  }

  // Projection, p = 1e7.
  double proj_dense = -1, proj_sjlt = -1;
  std::string proj_err;
  if (a.projection) {
    proj_dense = TimeProjectionCuda(rk::ProjectionType::kRademacher, 10000000,
                                    &proj_err);
    if (proj_dense > 0)
      proj_sjlt =
          TimeProjectionCuda(rk::ProjectionType::kSjlt, 10000000, &proj_err);
    if (proj_dense > 0 && proj_sjlt > 0) {
      std::printf(
          "projection on CUDA, p=1e7 D=1024 B=1: dense %.3f ms, sjlt %.3f ms\n",
          proj_dense * 1e3, proj_sjlt * 1e3);
    } else {
      std::printf("projection on CUDA failed: %s\n", proj_err.c_str());
      ++failures;
    }
  }
  std::fflush(stdout);

  // The store, on the device.
  const int64_t cs = int64_t{a.checkpoints} * a.slots;
  const int64_t row = cs * a.dim;
  const size_t vec_bytes = size_t(a.n * row * 2);
  const size_t norm_bytes = size_t(a.n * cs * 4);
  const int q_max = *std::max_element(a.queries.begin(), a.queries.end());
  const rk::StoreLayout layout{rk::DType::kF16, a.checkpoints, a.slots, a.dim};
  const int64_t sub = a.subsample;
  // Sizes only: CudaScanScratchBytes does not read the pointers.
  static const float kProbe = 0;
  const std::vector<rk::StoreChunk> probe_full = {{&kProbe, &kProbe, a.n, 0}};
  const std::vector<rk::StoreChunk> probe_sub = {{&kProbe, &kProbe, sub, 0}};
  size_t scratch_bytes = 0;
  for (int q : a.queries) {
    for (const Batch& b : Batches(q)) {
      for (int k : a.ks) {
        for (rk::CudaScanPath path : {a.cuda_path, rk::CudaScanPath::kFp32}) {
          for (const auto* probe : {&probe_full, &probe_sub}) {
            rk::ScanOptions opt;
            opt.k = k;
            opt.cuda_path = path;
            size_t bytes = 0;
            rk::KernelStatus s =
                rk::CudaScanScratchBytes(layout, *probe, b.count, opt, &bytes);
            if (!s.ok()) {
              std::printf("CudaScanScratchBytes failed: %s\n",
                          s.ToString().c_str());
              return 1;
            }
            scratch_bytes = std::max(scratch_bytes, bytes);
          }
        }
      }
    }
  }
  const size_t need = vec_bytes + norm_bytes + scratch_bytes +
                      size_t(q_max) * size_t(row + cs) * 8;
  cudaMemGetInfo(&free_bytes, &total_bytes);
  std::printf(
      "scan_gpu_bench: N=%lld C=%d S=%d D=%d fp16, store %.2f GB + norms "
      "%.3f GB, scratch %.3f GB, kMaxQueries %d, subsample %lld rows\n",
      (long long)a.n, a.checkpoints, a.slots, a.dim, vec_bytes / 1e9,
      norm_bytes / 1e9, scratch_bytes / 1e9, rk::kMaxQueries, (long long)sub);
  std::fflush(stdout);
  if (need + (size_t{1} << 30) > free_bytes) {
    const std::string why = "the store and scratch need " +
                            std::to_string(need / 1000000) + " MB, " +
                            std::to_string(free_bytes / 1000000) + " MB free";
    std::printf("scan skipped: %s\n", why.c_str());
    PrintNotMeasured(kRatioD2d, why);
    PrintNotMeasured(kRatioTorch, why);
    if (proj_dense > 0 && proj_sjlt > 0)
      std::printf("RATIO %s %.2f\n", kRatioProjection, proj_dense / proj_sjlt);
    return 1;
  }

  DeviceBuffer d_vectors, d_norms, d_raw, d_unit, d_wt, d_wr, d_scratch, d_sums;
  if (!d_vectors.Allocate(vec_bytes, "cudaMalloc (store)") ||
      !d_norms.Allocate(norm_bytes, "cudaMalloc (norms)") ||
      !d_raw.Allocate(size_t(q_max * row) * 4, "cudaMalloc (queries)") ||
      !d_unit.Allocate(size_t(q_max * row) * 4, "cudaMalloc (queries)") ||
      !d_wt.Allocate(size_t(q_max * cs) * 4, "cudaMalloc (weights)") ||
      !d_wr.Allocate(size_t(q_max * cs) * 4, "cudaMalloc (weights)") ||
      !d_scratch.Allocate(scratch_bytes, "cudaMalloc (scratch)") ||
      !d_sums.Allocate(16, "cudaMalloc (checksum)"))
    return 1;
  const double t_fill = rb::Now();
  if (!CudaOk(cudaError_t(rb::FillSyntheticStoreCuda(d_vectors.as<uint16_t>(),
                                                     d_norms.as<float>(), a.n,
                                                     cs, row, nullptr)),
              "filling the store") ||
      !CudaOk(cudaError_t(rb::ChecksumSyntheticStoreCuda(
                  d_vectors.as<uint16_t>(), a.n * row, d_norms.as<float>(),
                  a.n * cs, d_sums.as<unsigned long long>(), nullptr)),
              "checksum") ||
      !CudaOk(cudaDeviceSynchronize(), "filling the store"))
    return 1;
  unsigned long long sums[2] = {0, 0};
  if (!CudaOk(cudaMemcpy(sums, d_sums.as<void>(), 16, cudaMemcpyDeviceToHost),
              "cudaMemcpy"))
    return 1;
  std::printf(
      "store generated on the device in %.2f s; checksums vectors=%llu "
      "norms=%llu\n",
      rb::Now() - t_fill, sums[0], sums[1]);
  const HostQueries hq = MakeQueries(q_max, cs, row);
  if (!CudaOk(cudaMemcpy(d_raw.as<void>(), hq.raw.data(), hq.raw.size() * 4,
                         cudaMemcpyHostToDevice),
              "cudaMemcpy") ||
      !CudaOk(cudaMemcpy(d_unit.as<void>(), hq.unit.data(), hq.unit.size() * 4,
                         cudaMemcpyHostToDevice),
              "cudaMemcpy") ||
      !CudaOk(cudaMemcpy(d_wt.as<void>(), hq.tracin.data(),
                         hq.tracin.size() * 4, cudaMemcpyHostToDevice),
              "cudaMemcpy") ||
      !CudaOk(cudaMemcpy(d_wr.as<void>(), hq.retrac.data(),
                         hq.retrac.size() * 4, cudaMemcpyHostToDevice),
              "cudaMemcpy"))
    return 1;

  // The first `sub` rows on the host, for the CPU backend.
  std::vector<uint16_t> h_vectors(size_t(sub * row));
  std::vector<float> h_norms(size_t(sub * cs));
  if (!CudaOk(cudaMemcpy(h_vectors.data(), d_vectors.as<void>(),
                         h_vectors.size() * 2, cudaMemcpyDeviceToHost),
              "cudaMemcpy (subsample)") ||
      !CudaOk(cudaMemcpy(h_norms.data(), d_norms.as<void>(), h_norms.size() * 4,
                         cudaMemcpyDeviceToHost),
              "cudaMemcpy (subsample)"))
    return 1;

  const std::vector<rk::StoreChunk> full = {
      {d_vectors.as<void>(), d_norms.as<float>(), a.n, 0}};
  const std::vector<rk::StoreChunk> first_rows = {
      {d_vectors.as<void>(), d_norms.as<float>(), sub, 0}};
  const std::vector<rk::StoreChunk> host_rows = {
      {h_vectors.data(), h_norms.data(), sub, 0}};
  auto device_batch = [&](const Batch& b) {
    return rk::QueryBatch{b.count, d_raw.as<float>() + b.first * row,
                          d_unit.as<float>() + b.first * row,
                          d_wt.as<float>() + b.first * cs,
                          d_wr.as<float>() + b.first * cs};
  };
  auto host_batch = [&](const Batch& b) {
    return rk::QueryBatch{
        b.count, hq.raw.data() + b.first * row, hq.unit.data() + b.first * row,
        hq.tracin.data() + b.first * cs, hq.retrac.data() + b.first * cs};
  };
  rk::CudaScanPath chosen = rk::CudaScanPath::kAuto;
  if (rk::KernelStatus s = rk::ChooseCudaScanPath(layout, a.cuda_path, &chosen);
      !s.ok()) {
    std::printf("ChooseCudaScanPath failed: %s\n", s.ToString().c_str());
    return 1;
  }
  std::printf("scan path: %s (asked for %s)\n", rk::CudaScanPathName(chosen),
              rk::CudaScanPathName(a.cuda_path));
  auto scan = [&](const std::vector<rk::StoreChunk>& chunks, const Batch& b,
                  int k, rk::ScanResult* result,
                  rk::CudaScanPath path = rk::CudaScanPath::kAuto) {
    rk::ScanOptions opt;
    opt.k = k;
    opt.cuda_path = path == rk::CudaScanPath::kAuto ? a.cuda_path : path;
    rk::KernelStatus s =
        rk::ScanCuda(layout, chunks, device_batch(b), opt, d_scratch.as<void>(),
                     scratch_bytes, nullptr, result);
    if (!s.ok())
      std::printf("ScanCuda failed (Q=%d k=%d): %s\n", b.count, k,
                  s.ToString().c_str());
    return s.ok();
  };

  // scan_seconds[(q, k)], results of the last repetition for the PyTorch
  // comparison, and the CPU agreement text.
  const int k_cpu = std::min<int64_t>(rk::kMaxTopK, sub);
  std::map<std::pair<int, int>, double> scan_seconds;
  std::map<int, double> fp32_path_seconds;  // at the smallest k
  std::map<std::pair<int, int>, std::vector<rk::ScanResult>> scan_results;
  std::map<std::pair<int, int>, std::string> cpu_text;
  Agreement cpu_total;
  for (int q : a.queries) {
    const std::vector<Batch> batches = Batches(q);
    // The CPU lists of the first rows, once per batch, at the largest k.
    std::vector<rk::ScanResult> cpu(batches.size());
    const double t_cpu = rb::Now();
    for (size_t b = 0; b < batches.size(); ++b) {
      rk::ScanOptions opt;
      opt.k = k_cpu;
      rk::KernelStatus s =
          rk::ScanCpu(layout, host_rows, host_batch(batches[b]), opt, &cpu[b]);
      if (!s.ok()) {
        std::printf("ScanCpu failed: %s\n", s.ToString().c_str());
        return 1;
      }
    }
    std::printf("Q=%d: CPU scan of the first %lld rows at k=%d: %.2f s\n", q,
                (long long)sub, k_cpu, rb::Now() - t_cpu);
    for (int k : a.ks) {
      std::vector<rk::ScanResult> results(batches.size());
      double best = 1e30;
      for (int rep = 0; rep <= a.reps; ++rep) {  // rep 0 warms up
        if (!CudaOk(cudaDeviceSynchronize(), "cudaDeviceSynchronize")) return 1;
        const double t0 = rb::Now();
        for (size_t b = 0; b < batches.size(); ++b)
          if (!scan(full, batches[b], k, &results[b])) return 1;
        if (rep > 0) best = std::min(best, rb::Now() - t0);
      }
      scan_seconds[{q, k}] = best;
      if (k == a.ks.front() && chosen != rk::CudaScanPath::kFp32) {
        double best_fp32 = 1e30;
        rk::ScanResult r;
        for (int rep = 0; rep <= a.reps; ++rep) {
          if (!CudaOk(cudaDeviceSynchronize(), "cudaDeviceSynchronize"))
            return 1;
          const double t0 = rb::Now();
          for (const Batch& b : batches)
            if (!scan(full, b, k, &r, rk::CudaScanPath::kFp32)) return 1;
          if (rep > 0) best_fp32 = std::min(best_fp32, rb::Now() - t0);
        }
        fp32_path_seconds[q] = best_fp32;
        std::printf("Q=%d k=%d: fp32 path %.3f ms\n", q, k, best_fp32 * 1e3);
      }
      scan_results[{q, k}] = std::move(results);
      Agreement agree;
      for (size_t b = 0; b < batches.size(); ++b) {
        rk::ScanResult r;
        if (!scan(first_rows, batches[b], k, &r)) return 1;
        AddAgreement(r, cpu[b], k, k_cpu,
                     "Q=" + std::to_string(q) + " k=" + std::to_string(k) +
                         " batch " + std::to_string(b),
                     &agree);
      }
      cpu_text[{q, k}] = AgreementText(agree);
      if (agree.bad) {
        std::printf("GPU and CPU lists disagree (%lld entries): %s\n",
                    (long long)agree.bad, agree.first_bad.c_str());
        ++failures;
      }
      cpu_total.entries += agree.entries;
      cpu_total.max_abs_diff =
          std::max(cpu_total.max_abs_diff, agree.max_abs_diff);
      std::printf(
          "Q=%d k=%d: %.3f ms (%zu batch%s), %.1f GB/s, first %lld "
          "rows vs CPU: %s\n",
          q, k, best * 1e3, batches.size(), batches.size() > 1 ? "es" : "",
          (vec_bytes + norm_bytes) / best / 1e9, (long long)sub,
          cpu_text[{q, k}].c_str());
      std::fflush(stdout);
    }
  }
  std::printf(
      "GPU vs CPU on the first %lld rows: max |score difference| %.3g "
      "over %lld entries (tolerance %.0e x the list's largest |score|)\n",
      (long long)sub, cpu_total.max_abs_diff, (long long)cpu_total.entries,
      kAgreementRelTol);

  // The PyTorch way, after giving the device memory back.
  d_vectors.Reset();
  d_norms.Reset();
  d_scratch.Reset();
  TorchRun torch;
  if (a.torch) {
    torch = RunTorch(a, "cuda", "fp32,fp16");
  } else {
    torch.error = "--no-torch";
  }
  if (torch.error.empty()) {
    if (torch.have_checksum && torch.checksum_vectors == sums[0] &&
        torch.checksum_norms == sums[1]) {
      std::printf("pytorch: same data (checksums agree)\n");
    } else {
      std::printf("pytorch: DATA DIFFERS (checksums vectors=%llu norms=%llu)\n",
                  torch.checksum_vectors, torch.checksum_norms);
      ++failures;
    }
  } else {
    std::printf("pytorch: not run: %s\n", torch.error.c_str());
  }

  // The table and the ratios.
  std::printf("\nscan path %s\n", rk::CudaScanPathName(chosen));
  std::printf("%5s %5s %7s %10s %10s %7s %12s %11s %11s %9s %13s %11s\n", "Q",
              "k", "batches", "scan_ms", "scan_GB/s", "vs_d2d", "fp32path_ms",
              "torch32_ms", "torch16_ms", "vs_torch", "cpu_agree",
              "torch_agree");
  double worst_d2d = -1, worst_torch = -1;
  std::string worst_d2d_at, worst_torch_at;
  const int k_d2d = a.ks.front();
  for (int q : a.queries) {
    for (int k : a.ks) {
      const double t = scan_seconds[{q, k}];
      const double bw = (vec_bytes + norm_bytes) / t;
      const double vs_d2d = d2d > 0 ? bw / d2d : -1;
      auto ms_of = [&](const char* v) {
        auto it = torch.times.find(TimeKey{q, k, v});
        return it == torch.times.end() ? -1.0 : it->second.total_ms;
      };
      std::string variant;
      const double torch_ms = TorchBestMs(torch, q, k, &variant);
      const double vs_torch = torch_ms > 0 ? torch_ms * 1e-3 / t : -1;
      std::string torch_agree = "-";
      if (torch_ms > 0)
        torch_agree = CompareWithTorch(
            torch, q, k, "fp32", scan_results[{q, k}], Batches(q), nullptr);
      auto fp32_it = fp32_path_seconds.find(q);
      const double fp32_ms = k == k_d2d && fp32_it != fp32_path_seconds.end()
                                 ? fp32_it->second * 1e3
                                 : -1.0;
      std::printf(
          "%5d %5d %7zu %10.3f %10.1f %7.2f %12.3f %11.3f %11.3f %9.2f %13s "
          "%11s\n",
          q, k, Batches(q).size(), t * 1e3, bw / 1e9, vs_d2d, fp32_ms,
          ms_of("fp32"), ms_of("fp16"), vs_torch, cpu_text[{q, k}].c_str(),
          torch_agree.c_str());
      if (k == k_d2d && (q == 1 || q == 8 || q == 32) && vs_d2d > 0 &&
          (worst_d2d < 0 || vs_d2d < worst_d2d)) {
        worst_d2d = vs_d2d;
        worst_d2d_at = "Q=" + std::to_string(q) + " k=" + std::to_string(k);
      }
      if (vs_torch > 0 && (worst_torch < 0 || vs_torch < worst_torch)) {
        worst_torch = vs_torch;
        worst_torch_at = "Q=" + std::to_string(q) + " k=" + std::to_string(k) +
                         " against torch " + variant;
      }
    }
  }
  std::printf(
      "(scan_GB/s: store and norm bytes over the scan's time; vs_d2d: "
      "that over the copy's read + write bandwidth; fp32path_ms: the "
      "fp32 path's time at the smallest k; vs_torch: the "
      "faster PyTorch variant's time over the scan's; cpu_agree: "
      "entries at the same rank as the CPU's on the first rows; "
      "torch_agree: the first %d entries of queries 0 and Q-1 against "
      "torch fp32 on the whole store)\n\n",
      kTorchTopOut);
  if (worst_d2d > 0) {
    std::printf("# %s: worst at %s\n", kRatioD2d, worst_d2d_at.c_str());
    std::printf("RATIO %s %.2f\n", kRatioD2d, worst_d2d);
  } else {
    PrintNotMeasured(kRatioD2d, d2d > 0
                                    ? "no Q of 1, 8, 32 was run"
                                    : "the copy bandwidth was not measured");
  }
  if (worst_torch > 0) {
    std::printf("# %s: worst at %s\n", kRatioTorch, worst_torch_at.c_str());
    std::printf("RATIO %s %.2f\n", kRatioTorch, worst_torch);
  } else {
    PrintNotMeasured(kRatioTorch,
                     torch.error.empty() ? "no PyTorch times" : torch.error);
  }
  if (proj_dense > 0 && proj_sjlt > 0) {
    std::printf("RATIO %s %.2f\n", kRatioProjection, proj_dense / proj_sjlt);
  } else {
    PrintNotMeasured(kRatioProjection,
                     a.projection ? proj_err : "--no-projection");
  }
  if (failures)
    std::printf("scan_gpu_bench: %d failure(s), see above\n", failures);
  return failures ? 1 : 0;
}

#endif  // RETRACE_HAVE_CUDA

}  // namespace

int main(int argc, char** argv) {
  const Args a = Parse(argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (a.cpu_rehearsal) return CpuRehearsal(a);
  if (!rk::CudaDeviceAvailable()) {
    const std::string why = "no CUDA device: " + rk::CudaAvailabilityReason();
    std::printf("# GPU scan benchmark skipped: %s\n", why.c_str());
    PrintNotMeasured(kRatioD2d, why);
    PrintNotMeasured(kRatioTorch, why);
    PrintNotMeasured(kRatioProjection, why);
    return 0;
  }
#ifdef RETRACE_HAVE_CUDA
  return GpuBench(a);
#else
  return 0;
#endif
}
