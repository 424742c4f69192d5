#!/usr/bin/env bash
# Configures and builds retrace for a GPU node against a given LibTorch. This
# is the one set of configure and build commands that both the GPU image
# (Dockerfile.gpu) and a bare GPU machine (scripts/gpu-node-check.sh) run, so
# that a run of either exercises the other's build steps.
#
#   scripts/build-node.sh --build-dir DIR (--torch-prefix DIR | --torch-python PY)
#       [--deps-prefix DIR] [--cuda-compiler NVCC] [--cuda-architectures LIST]
#       [--build-type TYPE] [--no-tests] [--no-bench] [--target NAME]...
#       [--configure-only | --build-only] [--keep-going] [--no-cuda]
#       [--dry-run] [-- CMAKE_ARG...]
#
#   --build-dir DIR         CMake build tree (created).
#   --torch-prefix DIR      where LibTorch's CMake package is: a LibTorch
#                           distribution's root, or PyTorch's
#                           torch.utils.cmake_prefix_path.
#   --torch-python PY       a Python that imports torch; its
#                           torch.utils.cmake_prefix_path is the prefix (what a
#                           PyTorch installation offers, e.g. a CUDA wheel).
#   --deps-prefix DIR       another prefix with the other dependencies (gRPC,
#                           protobuf, abseil, ...), e.g. Debian packages
#                           unpacked with `dpkg -x` (pass its usr/). Searched by
#                           CMake before the system; its bin/ goes on PATH and
#                           its libraries on LD_LIBRARY_PATH for the build's
#                           tools (protoc, grpc_cpp_plugin).
#   --cuda-compiler NVCC    nvcc to build the kernels with (default: CMake's
#                           search, CUDACXX or nvcc on PATH).
#   --cuda-architectures L  CMAKE_CUDA_ARCHITECTURES (default "80-real;90",
#                           the project's default); LibTorch's own
#                           TORCH_CUDA_ARCH_LIST is set to match, so that its
#                           CMake files do not try to detect a GPU.
#   --build-type TYPE       CMAKE_BUILD_TYPE (default Release).
#   --no-tests, --no-bench  leave the tests / benchmarks out (the image).
#   --target NAME           build only these targets (repeatable; default all).
#   --configure-only        run only the configure step,
#   --build-only            only the build step (of a configured tree): for
#                           callers that time or limit the two apart.
#   --keep-going            build as much as possible past a failure.
#   --no-cuda               -DRETRACE_WITH_CUDA=OFF: only for rehearsing on a
#                           machine without nvcc (gpu-node-check.sh
#                           --no-require-gpu); never for a node.
#   --dry-run               print the commands without running them.
#   -- CMAKE_ARG...         passed to the configure step as they are.
#
# Builds with -DRETRACE_WITH_CUDA=ON unless --no-cuda: a GPU node without the
# CUDA kernels is a configuration error, not a fallback. Prints each command
# before it runs it. Exit status: that of the first failing command, 2 for a
# usage error.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir="" torch_prefix="" torch_python="" deps_prefix="" cuda_compiler=""
cuda_architectures="80-real;90"
tests=ON bench=ON dry_run=0 build_type=Release steps=both keep_going=0 cuda=ON
targets=() extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build_dir=${2:?}; shift 2 ;;
    --torch-prefix) torch_prefix=${2:?}; shift 2 ;;
    --torch-python) torch_python=${2:?}; shift 2 ;;
    --deps-prefix) deps_prefix=${2:?}; shift 2 ;;
    --cuda-compiler) cuda_compiler=${2:?}; shift 2 ;;
    --cuda-architectures) cuda_architectures=${2:?}; shift 2 ;;
    --no-tests) tests=OFF; shift ;;
    --no-bench) bench=OFF; shift ;;
    --target) targets+=("${2:?}"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --build-type) build_type=${2:?}; shift 2 ;;
    --configure-only) steps=configure; shift ;;
    --build-only) steps=build; shift ;;
    --keep-going) keep_going=1; shift ;;
    --no-cuda) cuda=OFF; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "build-node: unknown argument '$1'" >&2; usage ;;
  esac
done
[ -n "$build_dir" ] || { echo "build-node: --build-dir is required" >&2; exit 2; }
if [ "$steps" = build ]; then
  :  # the configured tree already knows its LibTorch
elif { [ -n "$torch_prefix" ] && [ -n "$torch_python" ]; } ||
   { [ -z "$torch_prefix" ] && [ -z "$torch_python" ]; }; then
  echo "build-node: give exactly one of --torch-prefix and --torch-python" >&2
  exit 2
fi

run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ $dry_run -eq 0 ]; then "$@"; fi
}

if [ -n "$torch_python" ] && [ "$steps" != build ]; then
  torch_prefix=$("$torch_python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
  echo "build-node: LibTorch of $("$torch_python" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)') at $torch_prefix"
fi
if [ "$steps" != build ] && [ ! -d "$torch_prefix" ] && [ $dry_run -eq 0 ]; then
  echo "build-node: LibTorch prefix '$torch_prefix' is not a directory" >&2
  exit 1
fi

prefix_path="$torch_prefix"
if [ -n "$deps_prefix" ]; then
  prefix_path="$deps_prefix;$torch_prefix"
  multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
  export PATH="$deps_prefix/bin:$PATH"
  export LD_LIBRARY_PATH="$deps_prefix/lib/$multiarch:$deps_prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# "80-real;90" -> "8.0;9.0": LibTorch's spelling of the same architectures.
torch_arch_list=$(tr ';' '\n' <<<"$cuda_architectures" |
  sed -e 's/-real$//' -e 's/-virtual$//' -e 's/^\([0-9]*\)\([0-9]\)$/\1.\2/' |
  paste -sd ';')
export TORCH_CUDA_ARCH_LIST="$torch_arch_list"

generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi

configure=(cmake -S "$src" -B "$build_dir" "${generator[@]}"
  "-DCMAKE_BUILD_TYPE=$build_type"
  "-DCMAKE_PREFIX_PATH=$prefix_path"
  "-DRETRACE_WITH_CUDA=$cuda"
  "-DRETRACE_BUILD_TESTS=$tests" "-DRETRACE_BUILD_BENCH=$bench")
if [ "$cuda" = ON ]; then
  configure+=("-DCMAKE_CUDA_ARCHITECTURES=$cuda_architectures"
              "-DTORCH_CUDA_ARCH_LIST=$torch_arch_list")
  if [ -n "$cuda_compiler" ]; then
    configure+=("-DCMAKE_CUDA_COMPILER=$cuda_compiler")
  fi
fi
if [ "$steps" != build ]; then
  run "${configure[@]}" "${extra[@]}"
fi
[ "$steps" != configure ] || exit 0

build=(cmake --build "$build_dir" --parallel "${BUILD_JOBS:-$(nproc)}")
if [ ${#targets[@]} -gt 0 ]; then build+=(--target "${targets[@]}"); fi
if [ $keep_going -eq 1 ]; then
  # The generator the tree was configured with decides the spelling.
  if grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja' "$build_dir/CMakeCache.txt" 2>/dev/null ||
     { [ ! -f "$build_dir/CMakeCache.txt" ] && [ ${#generator[@]} -gt 0 ]; }; then
    build+=(-- -k 0)
  else
    build+=(-- -k)
  fi
fi
run "${build[@]}"
