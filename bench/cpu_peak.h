// This machine's limits, measured in the same run as the CPU benchmarks so
// that their ratios compare with what the hardware can do now: the memory
// read bandwidth over a large buffer, the fp32 fused multiply-add peak of
// each instruction set the CPU has and the AMX matrix unit's bf16 peak, on
// every worker thread at once.
#ifndef RETRACE_BENCH_CPU_PEAK_H_
#define RETRACE_BENCH_CPU_PEAK_H_

#include <cstdint>

namespace retrace::bench {

// Bytes per second of `threads` threads each summing its slice of buf
// (bytes long, 64-byte aligned or not) with the widest loads the CPU has;
// the best of three passes.
double ReadBandwidth(const void* buf, int64_t bytes, int threads);

// fp32 multiply-adds per second (one FMA = one, not two) with `threads`
// threads of independent fmadd chains: `lanes` is 8 (AVX2) or 16 (AVX-512).
// 0 when the CPU lacks that width.
double FmaPeak(int lanes, int threads);

// bf16 multiply-adds per second of the AMX matrix unit (TDPBF16PS, one
// 16x16x32 tile product = 8192) with `threads` threads at once, the best of
// three; 0 when this CPU (or its OS) offers no AMX.
double AmxPeak(int threads);

}  // namespace retrace::bench

#endif  // RETRACE_BENCH_CPU_PEAK_H_
