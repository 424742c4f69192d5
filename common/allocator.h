// Process-wide memory allocator settings.
#ifndef RETRACE_COMMON_ALLOCATOR_H_
#define RETRACE_COMMON_ALLOCATOR_H_

namespace retrace {

// Featurization allocates and frees blocks of tens of megabytes many times a
// second (per-sample gradients, their activations). glibc's malloc gives
// blocks above its mmap threshold (at most 32 MiB by default) back to the
// kernel on free and trims the heap's free top, so each new block is faulted
// in and zeroed page by page again: measured, a third of featurization time.
// This keeps freed blocks of up to kKeptBlockBytes in the heap for reuse
// (mmap and trim thresholds at that size), so a process's resident memory
// stays near its peak instead of shrinking between batches.
//
// Called first thing by the programs that featurize (retraced, retrace-batch,
// the benchmarks). Does nothing, and returns false, when the environment
// already sets malloc's thresholds (MALLOC_MMAP_THRESHOLD_,
// MALLOC_TRIM_THRESHOLD_, or glibc.malloc tunables in GLIBC_TUNABLES): an
// operator's choice wins. Also false where the C library is not glibc, or
// where mallopt refuses (a sanitizer's allocator).
bool KeepFreedMemoryForReuse();

inline constexpr long kKeptBlockBytes = 1L << 30;  // 1 GiB

// Hands the freed memory that the heap holds back to the kernel once (glibc's
// malloc_trim), keeping what is in use. A server calls it when start-up is
// over: what loading the model and the store freed would otherwise stay
// resident for the process's life under KeepFreedMemoryForReuse (measured:
// retraced idled at twice its memory). Later batches grow the heap again to
// their own working size, which is then kept. Does nothing outside glibc.
void ReleaseFreedMemory();

}  // namespace retrace

#endif  // RETRACE_COMMON_ALLOCATOR_H_
