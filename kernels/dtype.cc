#include "kernels/dtype.h"

#include <cstring>

namespace retrace::kernels {

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kF32:
      return "F32";
  }
  return "?";
}

bool ParseDType(const char* name, DType* out) {
  struct Entry {
    const char* a;
    const char* b;
    DType t;
  };
  static constexpr Entry kEntries[] = {{"F16", "fp16", DType::kF16},
                                       {"BF16", "bf16", DType::kBF16},
                                       {"F32", "fp32", DType::kF32}};
  for (const Entry& e : kEntries) {
    if (std::strcmp(name, e.a) == 0 || std::strcmp(name, e.b) == 0) {
      *out = e.t;
      return true;
    }
  }
  return false;
}

}  // namespace retrace::kernels
