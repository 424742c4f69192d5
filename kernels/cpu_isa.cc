#include "kernels/cpu_isa.h"

#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define RETRACE_CPU_X86 1
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#define RETRACE_CPU_AMX_LINUX 1
#endif

namespace retrace::kernels {
namespace {

#ifdef RETRACE_CPU_X86
// F16C from cpuid leaf 1 (ECX bit 29): clang before 15 does not know
// __builtin_cpu_supports("f16c").
bool CpuHasF16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & (1u << 29)) != 0;
}

bool CpuHasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("fma") && CpuHasF16c();
  return has;
}

// AVX-512 F, BW, VL and DQ (libgcc's check includes the OS's XCR0 state for
// the 512-bit registers).
bool CpuHasAvx512() {
  static const bool has = CpuHasAvx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq");
  return has;
}

#ifdef RETRACE_CPU_AMX_LINUX
// The CPU's AMX-TILE and AMX-BF16 (cpuid leaf 7: EDX bits 24 and 22) and
// AVX512-BF16 (leaf 7 subleaf 1: EAX bit 5), the OS's tile state enabled in
// XCR0 (bits 17 and 18), and this process granted that state: Linux hands
// out the 8 KiB tile register file only on request (ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA), and a tile instruction without it is SIGILL. The
// grant is process-wide and asked for once.
bool CpuHasAmx() {
  static const bool has = [] {
    if (!CpuHasAvx512()) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
    const bool tile = (edx & (1u << 24)) != 0;
    const bool bf16 = (edx & (1u << 22)) != 0;
    if (!tile || !bf16 || eax < 1) return false;
    unsigned eax1 = 0, ebx1 = 0, ecx1 = 0, edx1 = 0;
    __get_cpuid_count(7, 1, &eax1, &ebx1, &ecx1, &edx1);
    if ((eax1 & (1u << 5)) == 0) return false;
    unsigned xcr0_lo = 0, xcr0_hi = 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & (3u << 17)) != (3u << 17)) return false;
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return has;
}
#else
bool CpuHasAmx() { return false; }
#endif  // RETRACE_CPU_AMX_LINUX
#else
bool CpuHasAvx2() { return false; }
bool CpuHasAvx512() { return false; }
bool CpuHasAmx() { return false; }
#endif  // RETRACE_CPU_X86

bool CpuSupports(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar:
      return true;
    case CpuIsa::kAvx2:
      return CpuHasAvx2();
    case CpuIsa::kAvx512:
      return CpuHasAvx512();
    case CpuIsa::kAmx:
      return CpuHasAmx();
    case CpuIsa::kAuto:
      return true;
  }
  return false;
}

}  // namespace

const char* CpuIsaName(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAuto:
      return "auto";
    case CpuIsa::kScalar:
      return "scalar";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAmx:
      return "amx";
  }
  return "unknown";
}

bool ParseCpuIsa(const std::string& name, CpuIsa* isa) {
  for (CpuIsa i : {CpuIsa::kAuto, CpuIsa::kScalar, CpuIsa::kAvx2,
                   CpuIsa::kAvx512, CpuIsa::kAmx}) {
    if (name == CpuIsaName(i)) {
      *isa = i;
      return true;
    }
  }
  return false;
}

std::vector<CpuIsa> SupportedCpuIsas() {
  std::vector<CpuIsa> out;
  for (CpuIsa isa :
       {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAmx}) {
    if (CpuSupports(isa)) out.push_back(isa);
  }
  return out;
}

KernelStatus ResolveCpuIsa(CpuIsa requested, CpuIsa* chosen) {
  if (chosen == nullptr) {
    return KernelStatus::InvalidArgument("chosen pointer is null");
  }
  const int value = static_cast<int>(requested);
  if (value < 0 || value > static_cast<int>(CpuIsa::kAmx)) {
    return KernelStatus::InvalidArgument("unknown CPU instruction set " +
                                         std::to_string(value));
  }
  if (requested != CpuIsa::kAuto) {
    if (!CpuSupports(requested)) {
      return KernelStatus::Unavailable(
          std::string("this CPU cannot run the ") + CpuIsaName(requested) +
          " kernels (or they are not built for this architecture)");
    }
    *chosen = requested;
    return KernelStatus::Ok();
  }
  // The widest supported, at most the one RETRACE_CPU_ISA names.
  int cap = static_cast<int>(CpuIsa::kAmx);
  if (const char* env = std::getenv(kCpuIsaEnv); env != nullptr && *env) {
    CpuIsa named = CpuIsa::kAuto;
    if (!ParseCpuIsa(env, &named) || named == CpuIsa::kAuto) {
      return KernelStatus::InvalidArgument(
          std::string(kCpuIsaEnv) + "='" + std::string(env).substr(0, 32) +
          "' is not one of scalar, avx2, avx512, amx");
    }
    cap = static_cast<int>(named);
  }
  *chosen = CpuIsa::kScalar;
  for (CpuIsa isa : SupportedCpuIsas()) {
    if (static_cast<int>(isa) <= cap) *chosen = isa;
  }
  return KernelStatus::Ok();
}

}  // namespace retrace::kernels
