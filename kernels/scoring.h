// Fused attribution scan: TracIn and ReTrac scores of every store row against
// a batch of queries, with exact top-k (proponents) and bottom-k (opponents).
//
// For store row n (C checkpoints x S slots, each a D-vector u[n,cs] with its
// full-dimensional norm[n,cs]) and query q:
//   TracIn(n,q) = sum_cs a_tracin[q,cs] * norm[n,cs] * <u[n,cs], raw[q,cs]>
//   ReTrac(n,q) = sum_cs a_retrac[q,cs] *             <u[n,cs], unit[q,cs]>
// Both come out of one read of each row: the row is converted to fp32 once and
// dotted with all 2Q query vectors.
//
// Determinism: the score of (n, q) is computed by the same fixed sequence of
// floating-point operations whatever the thread count, the chunking of the
// store or the other queries in the batch, so a request gets the same answer
// alone or batched. Ranking uses a total order: higher score first (top list)
// or lower score first (bottom list), ties broken by the LOWER sample index in
// both lists; NaN scores (only possible with a corrupt store) rank last in both
// lists, and -0 ranks equal to +0. The CPU and CUDA backends each follow this
// contract; between them scores agree within a float tolerance, not bit for
// bit (different summation trees).
//
// Arithmetic paths of the CUDA scan (ScanOptions::cuda_path, chosen by
// ChooseCudaScanPath from the store's dtype and dim only, never from the
// batch, so that a query's scores are the same alone or batched):
//  - kFp32, the exactness reference: each store value is converted to fp32
//    and each dot is ONE fmaf chain over d in order, with fp32 queries; the
//    per-slot terms are folded into the score with fmaf in cs order.
//  - kTensorCore (fp16 and bf16 stores): each dot runs on tensor cores
//    (WMMA 16x16x16, fp32 accumulation). The store values enter exactly; each
//    fp32 query vector is scaled by a power of two (per query, slot and
//    method, from its own largest value) and split into hi + lo in the
//    store's type, so each query value is represented to a relative 2^-22
//    (fp16) or 2^-16 (bf16); fp16 values below 2^-17 of their vector's
//    largest are held to an absolute 2^-39 of that largest instead (the lo
//    part is subnormal there). The products are exact; the accumulation follows
//    one fixed sequence of MMA steps (d = 0, 16, 32, ...; hi then lo) whose
//    internal adds are the hardware's (fp32 with truncation, not IEEE
//    round-to-nearest), then the same fmaf fold in cs order. Scores agree with
//    the kFp32 path within a relative 2^-16 + 2e-5 (bf16) or 2e-5 (fp16) of
//    the sum of the absolute terms, not bit for bit.
// Each path is deterministic on its own: same device, same inputs -> same
// bits, whatever the batch, the chunking or the query's place in the batch.
//
// Errors: kInvalidArgument with a message naming the bad argument (k out of
// 1..min(kMaxTopK, N), Q out of 1..kMaxQueries, null pointers, non-positive
// sizes, non-finite query values or weights with their query and slot,
// overlapping chunks); kOutOfMemory; kDeviceError; kUnavailable for the CUDA
// entry points in a build without CUDA or on a machine without a device.
//
// Thread safety: every function is reentrant; concurrent calls must not share
// an output object. The CPU scan uses its own worker threads.
#ifndef RETRACE_KERNELS_SCORING_H_
#define RETRACE_KERNELS_SCORING_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/cpu_isa.h"
#include "kernels/dtype.h"
#include "kernels/kernel_status.h"

// The CUDA runtime's stream handle (cudaStream_t is CUstream_st*), declared
// here so that this header is the same in builds with and without CUDA.
struct CUstream_st;

namespace retrace::kernels {

// Queries per scan. The CUDA kernels' launch configurations cover exactly
// this many (8 tensor-core column fragments, 32 fp32 column groups); 128
// would need a wider configuration of each, and the server's --max-batch
// range follows this constant.
inline constexpr int kMaxQueries = 64;
inline constexpr int kMaxTopK = 4096;
// Sample indices are packed into 32 bits next to the score during selection;
// a store may hold up to this many samples (indices 0..kMaxSamples-1).
inline constexpr int64_t kMaxSamples = (int64_t{1} << 32) - 1;

enum class Method : int { kTracIn = 0, kReTrac = 1 };
inline constexpr int kNumMethods = 2;

// Shape and element type shared by every chunk of one store.
struct StoreLayout {
  DType dtype = DType::kF16;
  int32_t checkpoints = 0;  // C
  int32_t slots = 0;        // S: slots per checkpoint (buckets + replay)
  int32_t dim = 0;          // D: projected dimension

  // C * S: the (checkpoint, slot) pairs, indexed cs = c * S + s.
  int64_t SlotPairs() const { return int64_t{checkpoints} * slots; }
  // Values in one store row: C * S * D.
  int64_t RowValues() const { return SlotPairs() * dim; }
};

// A contiguous range of store rows, e.g. one memory-mapped shard. Host
// memory for ScanCpu, device memory for ScanCuda. Not owned.
struct StoreChunk {
  const void* vectors = nullptr;  // [rows, C, S, D] of layout.dtype
  const float* norms = nullptr;   // [rows, C, S]
  int64_t rows = 0;               // >= 1
  int64_t first_index = 0;        // global sample index of row 0
};

// A batch of Q queries, all in the store's (C, S, D) layout, fp32. Host
// memory for ScanCpu, device memory for ScanCuda. Not owned. A weight of 0
// leaves the slot out of that query's score.
struct QueryBatch {
  int32_t num_queries = 0;                // Q, 1..kMaxQueries
  const float* raw = nullptr;             // [Q, C, S, D] q_raw (TracIn)
  const float* unit = nullptr;            // [Q, C, S, D] q_unit (ReTrac)
  const float* tracin_weights = nullptr;  // [Q, C, S] a_tracin
  const float* retrac_weights = nullptr;  // [Q, C, S] a_retrac
};

// Arithmetic of the CUDA scan (see the top of this file). kAuto takes
// ChooseCudaScanPath's choice.
enum class CudaScanPath { kAuto, kFp32, kTensorCore };

// Stores with a smaller dim take the fp32 path under kAuto: one 16-value MMA
// step would be mostly padding.
inline constexpr int32_t kTensorCoreMinDim = 16;

// Instruction sets of the CPU scan (ScanOptions::isa; kernels/cpu_isa.h says
// how one is chosen):
//  - kScalar: portable C++, 8-lane fp32 chains (the generic path, everywhere);
//  - kAvx2: the same 8-lane chains; rows converted to fp32 into a per-thread
//    buffer first;
//  - kAvx512: 16-lane fp32 chains reading the stored fp16/bf16/fp32 values
//    directly and converting them in registers;
//  - kAmx (bf16 stores, and fp16 stores when asked for by name; see
//    ChooseCpuScanIsa for what kAuto takes): the dots
//    of 16 rows with up to 16 query columns per matrix-unit instruction
//    (TDPBF16PS: bf16 products, fp32 accumulation). bf16 rows enter as
//    stored; each fp16 value is split exactly into two bf16 values (the top
//    8 significant bits and the remaining 3). Each fp32 query vector is
//    scaled by a power of two (from its own largest value) and split into
//    hi + lo bf16 parts, so each query value is represented to a relative
//    2^-16; the products are exact and each dot is one fixed sequence of
//    matrix steps over d (32 values per step; hi then lo for fp16), then
//    hi-column + lo-column in double.
//
// Accuracy: every path converts the stored values exactly and computes each
// dot as one fp32 fmadd chain per lane (8 or 16 lanes over d, then a fixed
// tree of adds), the slot terms in double. Against the exact (double) sum,
// a score is within a relative 2e-5 of the sum of its absolute terms for
// D up to 4096 (checked by the tests for every path this CPU has); kAmx
// within 2e-5 + 2^-16 (the split query), plus an absolute 2^-126 of the
// query's largest value per product (the matrix unit flushes subnormal
// inputs and results to zero). Paths
// differ from each other by the summation tree (and kAmx by its query
// split), so the same store and query give scores that agree within that
// tolerance, not bit for bit; within one path a query's scores do not depend
// on its batch (kAmx too: a column's sums never see the other columns).

struct ScanOptions {
  int32_t k = 10;               // 1..min(kMaxTopK, total rows)
  bool want_bottom = true;      // also return the k smallest scores
  bool want_breakdown = false;  // fill ScoredSample::breakdown
  int32_t num_threads = 0;      // CPU: worker threads, 0 = CpuThreads()
  CpuIsa isa = CpuIsa::kAuto;   // CPU only
  CudaScanPath cuda_path = CudaScanPath::kAuto;  // CUDA only
};

struct ScoredSample {
  int64_t index = 0;  // global sample index
  float score = 0.0f;
  // With ScanOptions::want_breakdown: the C*S contributions (index cs) whose
  // sum is the score up to float rounding; empty otherwise.
  std::vector<float> breakdown;
};

// The ranking of one (query, method).
struct RankedList {
  std::vector<ScoredSample> top;     // k highest scores, best first
  std::vector<ScoredSample> bottom;  // k lowest, lowest first (if wanted)
};

struct ScanResult {
  // per_query[q][static_cast<int>(method)].
  std::vector<std::array<RankedList, kNumMethods>> per_query;

  const RankedList& Get(int query, Method method) const {
    return per_query[query][static_cast<int>(method)];
  }
};

// Checks the layout, chunks (sizes, non-null, disjoint index ranges below
// kMaxSamples), queries (sizes, non-null) and options against each other.
// Does not read the pointed-to data (which may live on the device).
KernelStatus ValidateScan(const StoreLayout& layout,
                          const std::vector<StoreChunk>& chunks,
                          const QueryBatch& queries,
                          const ScanOptions& options);

// The instruction set ScanCpu runs for `requested` on a store of `dtype`:
// what ResolveCpuIsa gives, except that the matrix unit (kAmx) runs only for
// bf16 stores, and for fp16 stores when kAmx is asked for by name; otherwise
// kAmx runs the kAvx512 code. An fp16 value has to be split into two bf16
// values in memory before the matrix unit can read it, and measured that way
// the split cost more than the unit saved at one query (2.3-3x slower than
// AVX-512) and gave 1.2-1.5x at 32 (docs/benchmarks.md); bf16 values go to it
// as stored. The answer depends on the arguments and the CPU only, never on the
// batch. Errors as ResolveCpuIsa.
KernelStatus ChooseCpuScanIsa(CpuIsa requested, DType dtype, CpuIsa* chosen);

// The arithmetic path ScanCuda takes: `requested` unless it is kAuto; kAuto
// picks kTensorCore for fp16 and bf16 stores with dim >= kTensorCoreMinDim
// and kFp32 otherwise (fp32 stores keep fp32 arithmetic). The answer depends
// on the layout and the request only. kInvalidArgument for kTensorCore on an
// fp32 store or an unknown value. Host code; needs no device.
KernelStatus ChooseCudaScanPath(const StoreLayout& layout,
                                CudaScanPath requested, CudaScanPath* chosen);
const char* CudaScanPathName(CudaScanPath path);

// CPU backend and reference. Scans every chunk (host memory, read-only, may
// be memory-mapped) with options.num_threads threads and writes the ranking of
// every (query, method) to *result (replacing its contents). Query values and
// weights must be finite. Splitting the rows into chunks differently gives the
// same result.
KernelStatus ScanCpu(const StoreLayout& layout,
                     const std::vector<StoreChunk>& chunks,
                     const QueryBatch& queries, const ScanOptions& options,
                     ScanResult* result);

// Merges the results of scans over disjoint sets of samples (e.g. one per
// shard, each computed with the same queries and a k of at least `k`) into
// the exact top-k / bottom-k of their union, with the same ordering and
// tie-breaking as a single scan. Breakdowns travel with their samples.
// kInvalidArgument when the parts disagree on the number of queries, when
// k is out of 1..kMaxTopK, or when the union holds fewer than k samples.
KernelStatus MergeScanResults(const std::vector<ScanResult>& parts, int32_t k,
                              ScanResult* merged);

// ---------------------------------------------------------------------------
// CUDA backend. All chunk and query pointers are device memory on the current
// device; work is enqueued on `stream` (a cudaStream_t; nullptr = legacy
// default stream). The calls synchronize `stream` before returning, because
// the result is a host object: the inputs may be reused and freed afterwards.
// Each store row is read from device memory once per call for all queries.
//
// Scratch follows CUB's two-call convention: CudaScanScratchBytes reports the
// device bytes that ScanCuda needs for these arguments (total rows, Q, k, D,
// C*S); the caller allocates them (cudaMalloc alignment) and passes them in.
// One scratch buffer must not be used by two calls at the same time.

// Bytes of device scratch for ScanCuda(layout, chunks, queries.num_queries,
// options). Fails as ValidateScan and ChooseCudaScanPath do (pointers are not
// inspected; no device is needed). The size grows with Q, k, want_bottom and
// want_breakdown, so scratch sized for the largest batch and k serves every
// smaller request. It holds the [2Q, N] fp32 scores (never the per-slot
// partial dots), the prepared queries and the selection's state.
KernelStatus CudaScanScratchBytes(const StoreLayout& layout,
                                  const std::vector<StoreChunk>& chunks,
                                  int32_t num_queries,
                                  const ScanOptions& options,
                                  size_t* scratch_bytes);

// Like ScanCpu, on the device, with the arithmetic of options.cuda_path.
// The exact top-k / bottom-k selection is a multi-block radix select over the
// packed ranking keys (kernels/topk.h) that spreads every column over many
// blocks, so a single query still uses the whole device.
// options.num_threads and options.isa are ignored. kInvalidArgument when
// scratch_bytes is below what CudaScanScratchBytes reports or the queries hold
// a non-finite value.
KernelStatus ScanCuda(const StoreLayout& layout,
                      const std::vector<StoreChunk>& chunks,
                      const QueryBatch& queries, const ScanOptions& options,
                      void* scratch, size_t scratch_bytes, CUstream_st* stream,
                      ScanResult* result);

// Start-up check: scans a small random store on the device with every path
// the dtype allows and compares the ranking and scores with ScanCpu.
// kUnavailable without a device, kInternal on a mismatch, kDeviceError when
// CUDA fails.
KernelStatus CudaSelfTest();

}  // namespace retrace::kernels

#endif  // RETRACE_KERNELS_SCORING_H_
