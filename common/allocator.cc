#include "common/allocator.h"

#include <cstdlib>
#include <cstring>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace retrace {
namespace {

bool EnvironmentSetsMalloc() {
  if (std::getenv("MALLOC_MMAP_THRESHOLD_") != nullptr ||
      std::getenv("MALLOC_TRIM_THRESHOLD_") != nullptr) {
    return true;
  }
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  return tunables != nullptr &&
         std::strstr(tunables, "glibc.malloc.") != nullptr;
}

}  // namespace

bool KeepFreedMemoryForReuse() {
#if defined(__GLIBC__)
  if (EnvironmentSetsMalloc()) return false;
  // Both or neither: a fixed trim threshold alone also freezes the mmap
  // threshold at its 128 KiB default, which makes every large block an mmap.
  const int kept = static_cast<int>(kKeptBlockBytes);
  return mallopt(M_MMAP_THRESHOLD, kept) == 1 &&
         mallopt(M_TRIM_THRESHOLD, kept) == 1;
#else
  return false;
#endif
}

void ReleaseFreedMemory() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

}  // namespace retrace
