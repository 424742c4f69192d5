// Instruction sets of the CPU kernels (the scan and the projection), chosen
// at run time from cpuid so that one binary runs everywhere:
//  - kScalar: portable C++ (the generic path, on every CPU and architecture);
//  - kAvx2: AVX2 + FMA + F16C;
//  - kAvx512: AVX-512 F/BW/VL/DQ (with the OS's 512-bit register state);
//  - kAmx: kAvx512 plus AVX512-BF16 and the AMX matrix unit (AMX-TILE,
//    AMX-BF16), with the OS's tile state granted to this process (Linux:
//    arch_prctl ARCH_REQ_XCOMP_PERM, asked once). Kernels without a matrix
//    -unit path run their kAvx512 code under it.
// kAuto takes the widest the CPU supports, capped by the environment
// variable RETRACE_CPU_ISA (scalar, avx2, avx512 or amx) when it is set, so an
// operator or a test can force the generic path. Asking for an instruction
// set the CPU lacks is kUnavailable, never a crash. What each kernel does
// with each set, and how exact it is, is written in its own header.
#ifndef RETRACE_KERNELS_CPU_ISA_H_
#define RETRACE_KERNELS_CPU_ISA_H_

#include <string>
#include <vector>

#include "kernels/kernel_status.h"

namespace retrace::kernels {

enum class CpuIsa { kAuto, kScalar, kAvx2, kAvx512, kAmx };
inline constexpr char kCpuIsaEnv[] = "RETRACE_CPU_ISA";
const char* CpuIsaName(CpuIsa isa);
// The CpuIsa that CpuIsaName calls `name` (auto, scalar, avx2, avx512, amx);
// false for any other name.
bool ParseCpuIsa(const std::string& name, CpuIsa* isa);
// The instruction sets this CPU (and this build) can run, generic first.
std::vector<CpuIsa> SupportedCpuIsas();
// What a CPU kernel runs for `requested`. kUnavailable for an instruction
// set the CPU lacks; kInvalidArgument for an unknown value or an unknown
// RETRACE_CPU_ISA, naming it.
KernelStatus ResolveCpuIsa(CpuIsa requested, CpuIsa* chosen);

}  // namespace retrace::kernels

#endif  // RETRACE_KERNELS_CPU_ISA_H_
