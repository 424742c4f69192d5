#include "common/allocator.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

// AddressSanitizer brings its own malloc, which mallopt does not configure.
#if defined(__SANITIZE_ADDRESS__)
#define RETRACE_OWN_MALLOC 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RETRACE_OWN_MALLOC 1
#endif
#endif

namespace retrace {
namespace {

// Fills a block so that the compiler cannot drop the writes (or the
// allocation): the pages must really be touched.
void Touch(char* block, size_t bytes) {
  std::memset(block, 1, bytes);
  asm volatile("" : : "r"(block) : "memory");
}

#if defined(RETRACE_OWN_MALLOC)
#define SKIP_UNDER_SANITIZER() \
  GTEST_SKIP() << "AddressSanitizer replaces glibc's malloc here"
#else
#define SKIP_UNDER_SANITIZER() (void)0
#endif

#if defined(__GLIBC__)
TEST(AllocatorTest, AnOperatorsMallocSettingsWin) {
  SKIP_UNDER_SANITIZER();
  for (const char* name :
       {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"}) {
    SCOPED_TRACE(name);
    const char* value = std::strcmp(name, "GLIBC_TUNABLES") == 0
                            ? "glibc.malloc.trim_threshold=65536"
                            : "65536";
    ASSERT_EQ(setenv(name, value, 1), 0);
    EXPECT_FALSE(KeepFreedMemoryForReuse());
    ASSERT_EQ(unsetenv(name), 0);
  }
  // Other tunables are not malloc's.
  ASSERT_EQ(setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0", 1), 0);
  EXPECT_TRUE(KeepFreedMemoryForReuse());
  ASSERT_EQ(unsetenv("GLIBC_TUNABLES"), 0);
}

// A freed 64 MiB block stays in the heap (glibc's default would have handed
// it back to the kernel: above the 32 MiB most its threshold ever reaches).
TEST(AllocatorTest, AFreedLargeBlockStaysForReuse) {
  SKIP_UNDER_SANITIZER();
  ASSERT_TRUE(KeepFreedMemoryForReuse());
  constexpr size_t kBlock = size_t{64} << 20;
  const size_t free_before = mallinfo2().fordblks;
  const size_t mapped_before = mallinfo2().hblkhd;
  char* block = static_cast<char*>(malloc(kBlock));
  ASSERT_NE(block, nullptr);
  Touch(block, kBlock);
  EXPECT_EQ(mallinfo2().hblkhd, mapped_before) << "the block was mmapped";
  free(block);
  EXPECT_GE(mallinfo2().fordblks, free_before + kBlock);
}
// Resident pages of this process, from /proc/self/statm.
long ResidentBytes() {
  long size = 0, resident = 0;
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return -1;
  const int got = std::fscanf(f, "%ld %ld", &size, &resident);
  std::fclose(f);
  return got == 2 ? resident * sysconf(_SC_PAGESIZE) : -1;
}

// A kept 64 MiB block stays resident after free until ReleaseFreedMemory.
TEST(AllocatorTest, ReleaseHandsKeptBlocksBack) {
  SKIP_UNDER_SANITIZER();
  ASSERT_TRUE(KeepFreedMemoryForReuse());
  constexpr size_t kBlock = size_t{64} << 20;
  char* block = static_cast<char*>(malloc(kBlock));
  ASSERT_NE(block, nullptr);
  Touch(block, kBlock);
  free(block);
  const long kept = ResidentBytes();
  ASSERT_GT(kept, 0);
  ReleaseFreedMemory();
  const long released = ResidentBytes();
  EXPECT_LE(released, kept - long(kBlock / 2))
      << "kept " << kept << " bytes, " << released << " after the release";
}
#else
TEST(AllocatorTest, DoesNothingOutsideGlibc) {
  EXPECT_FALSE(KeepFreedMemoryForReuse());
}
#endif

}  // namespace
}  // namespace retrace
