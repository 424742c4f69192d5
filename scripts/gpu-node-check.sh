#!/usr/bin/env bash
# The whole server on a GPU node in one bounded run, for a machine that has
# CUDA (nvcc), CMake and PyTorch with CUDA but no gRPC, protobuf, abseil or
# other development packages, and no network:
#   1. preflight  the carried folder third_party-node/ (scripts/gpu-node-prepare.sh),
#                 nvcc, a device (nvidia-smi), LibTorch (the CMake files of
#                 python3's torch, or --torch-prefix); records the machine,
#                 its OS, compilers and tools (env.txt)
#   2. prefix     unpacks every carried .deb with dpkg -x into a prefix of its
#                 own (build-node/prefix; never over /), repoints absolute
#                 symbolic links into it, and runs its protoc and
#                 grpc_cpp_plugin (prefix.txt)
#   3. configure  the full project, RelWithDebInfo, CUDA for the device's
#                 architecture, every package from the prefix
#                 (CMAKE_PREFIX_PATH, CMAKE_INCLUDE_PATH/CMAKE_LIBRARY_PATH,
#                 protoc and grpc_cpp_plugin from it) and the machine's
#                 LibTorch; then checks that CMake took each package from the
#                 prefix (CMakeCache.txt)
#   4. build      with all cores: first what the later stages run (the
#                 gpu-labelled tests, retrace-batch, retraced, retrace,
#                 server_bench), then checks that no compiled file read a
#                 header of the system that the prefix also holds (ninja's
#                 dependency log) and that no link line names a system copy
#                 of a prefix library
#   5. ctest      ctest -L gpu of the whole tree; a skipped test fails it
#   6. demo       scripts/demo.sh --no-build --offline on this build (train,
#                 build-store, serve, query), with the carried Fashion-MNIST
#   7. bench      scripts/bench.sh server on this build (RATIO lines)
#   8. build-all  the rest of the tree (every test and benchmark), so that the
#                 whole project is proven to build; last, so that a tight
#                 budget spends its time on the figures first
# and writes into OUT_DIR: summary.txt (stages with UTC start times and
# seconds, test counts, figures, RATIO lines), env.txt, prefix.txt,
# build.log, ctest.log, demo.log, bench.txt (7 files). Each stage prints a UTC
# timestamp; the whole run stays within RETRACE_NODE_CHECK_BUDGET_S (default
# 540 s): a stage that would start past it is reported as not run.
#
#   scripts/gpu-node-check.sh [--require-gpu | --no-require-gpu]
#       [--torch-prefix DIR] [--quick] [--build-all-first] OUT_DIR
#
# --require-gpu (the default): a missing nvcc, device or CUDA LibTorch fails
# the preflight at once, loudly, and so does a skipped gpu test.
# --no-require-gpu: a rehearsal on a machine without a device (CPU build,
# gpu tests may skip). --torch-prefix DIR: a CMake prefix holding
# Torch/TorchConfig.cmake (default: python3 -c 'import torch;
# print(torch.utils.cmake_prefix_path)'). --quick: demo.sh --quick and a
# short server benchmark. --build-all-first: build the whole tree in stage 4.
# Exit status: 0 when every stage passed, 1 otherwise, 2 for a usage error.
#
# Environment: RETRACE_NODE_BUILD_DIR (build-node), RETRACE_NODE_CARRY_DIR
# (third_party-node), RETRACE_NODE_JOBS (nproc), RETRACE_NODE_CUDA_ARCHS
# (default: the device's, e.g. 90), RETRACE_NODE_CMAKE_ARGS (more configure
# arguments), RETRACE_NODE_PYTHON (python3), RETRACE_NODE_NICE (a nice level
# for the build, for a rehearsal on a shared machine), RETRACE_NODE_CAP_SCALE
# (multiplies each stage's own time cap, for a rehearsal on a slow machine),
# CUDACXX.
#
# On the device machine (prepare here first: scripts/gpu-node-prepare.sh,
# which prints what travels: about 28 MiB with the working tree), with the
# device tool's run verb:
#   command:   bash scripts/gpu-node-check.sh "$OUT"
#   carry:     ["third_party-node"]
#   kind:      nvidia-h200
#   timeout_s: 600
# The files under $OUT come back (8 files at most: this script writes 7). A
# rerun on the still-warm machine finds build-node/ there (ignored build
# outputs are kept between calls) and only rebuilds what changed; give it a
# smaller budget to fit what device time is left, e.g.
#   command:   RETRACE_NODE_CHECK_BUDGET_S=240 bash scripts/gpu-node-check.sh "$OUT"
#   timeout_s: 300
set -uo pipefail
cd "$(dirname "$0")/.."
src_dir=$(pwd)

usage() {
  echo "usage: scripts/gpu-node-check.sh [--require-gpu | --no-require-gpu] [--torch-prefix DIR]" \
    "[--quick] [--build-all-first] OUT_DIR" >&2
}

require_gpu=1
quick=0
build_all_first=0
torch_prefix=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --require-gpu) require_gpu=1 ;;
    --no-require-gpu) require_gpu=0 ;;
    --quick) quick=1 ;;
    --build-all-first) build_all_first=1 ;;
    --torch-prefix)
      [ $# -ge 2 ] || { usage; exit 2; }
      torch_prefix=$2; shift ;;
    --torch-prefix=*) torch_prefix=${1#--torch-prefix=} ;;
    -h|--help) usage; exit 0 ;;
    -*) usage; exit 2 ;;
    *) [ -n "$out" ] && { usage; exit 2; }; out=$1 ;;
  esac
  shift
done
[ -z "$out" ] && { usage; exit 2; }
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)

build=${RETRACE_NODE_BUILD_DIR:-build-node}
carry=${RETRACE_NODE_CARRY_DIR:-third_party-node}
budget=${RETRACE_NODE_CHECK_BUDGET_S:-540}
cap_scale=${RETRACE_NODE_CAP_SCALE:-1}
jobs=${RETRACE_NODE_JOBS:-$(nproc)}
python=${RETRACE_NODE_PYTHON:-python3}
nice_cmd=()
[ -n "${RETRACE_NODE_NICE:-}" ] && nice_cmd=(nice -n "$RETRACE_NODE_NICE")
t_start=$(date +%s)
deadline=$((t_start + budget))
summary="$out/summary.txt"
env_log="$out/env.txt"
prefix_log="$out/prefix.txt"
build_log="$out/build.log"
ctest_log="$out/ctest.log"
demo_log="$out/demo.log"
bench_log="$out/bench.txt"
for f in "$prefix_log" "$build_log" "$ctest_log" "$demo_log" "$bench_log"; do : >"$f"; done

stage_tool=gpu-node-check
# shellcheck source=lib/stages.sh
source scripts/lib/stages.sh

gpu_line="unknown"
torch_line="unknown"
test_line="not run"
write_summary() {
  {
    echo "retrace gpu-node-check, $(ts), $(hostname 2>/dev/null || echo unknown host)"
    echo "mode: $([ $require_gpu = 1 ] && echo require-gpu || echo no-require-gpu)$([ $quick = 1 ] && echo ', quick')"
    echo "GPU: $gpu_line"
    echo "LibTorch: $torch_line"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no git)')"
    echo
    printf '%-10s %-28s %-20s %8s  %s\n' stage status started seconds note
    local s
    for s in "${stages[@]}"; do
      IFS='|' read -r n st started sec note <<<"$s"
      printf '%-10s %-28s %-20s %8s  %s\n' "$n" "$st" "$started" "$sec" "$note"
    done
    echo
    echo "gpu tests: $test_line"
    if [ -s "$demo_log" ]; then
      echo
      echo "demo (demo.log):"
      grep -E '^(== |timings:|tracin|retrac|retraced drained)' "$demo_log" | sed 's/^/  /'
    fi
    if [ -s "$bench_log" ]; then
      echo
      echo "server benchmark (bench.txt):"
      sed -n '/^part  *clients/,/^$/p' "$bench_log" | sed 's/^/  /'
      grep -E '^soak [a-z]+: [0-9]+ requests' "$bench_log" | sed 's/^/  /'
      grep -E '^RATIO ' "$bench_log" | sort -u
    fi
    echo
    local elapsed=$(($(date +%s) - t_start))
    if [ ${#failed_stages[@]} -eq 0 ]; then
      echo "result: PASS (${elapsed}s)"
    else
      echo "result: FAIL (${elapsed}s): ${failed_stages[*]}"
    fi
  } >"$summary"
}


# ---- 1. preflight ------------------------------------------------------------
stage_started=$(ts)
say "== preflight (out: $out, build: $build, carried: $carry, budget ${budget}s)"
missing=()      # fatal everywhere
missing_gpu=()  # fatal with --require-gpu only
case "$src_dir" in
  *[[:space:]]*) missing+=("a source path without spaces (bench.sh splits its CMake arguments on them): $src_dir") ;;
esac
if [ ! -f "$carry/MANIFEST" ] || [ ! -d "$carry/debs" ]; then
  missing+=("the carried folder $carry/ (MANIFEST and debs/): run scripts/gpu-node-prepare.sh on a networked Debian machine and name $carry in the device run's carry list")
else
  absent=$(awk '{ print $3 }' "$carry/MANIFEST" | while read -r f; do [ -f "$carry/debs/$f" ] || echo "$f"; done)
  [ -n "$absent" ] && missing+=("packages listed in $carry/MANIFEST: $(echo $absent)")
fi
command -v cmake >/dev/null 2>&1 || missing+=("cmake")
if ! command -v dpkg-deb >/dev/null 2>&1 && ! { command -v ar >/dev/null 2>&1 && command -v tar >/dev/null 2>&1; }; then
  missing+=("dpkg-deb (or ar and tar) to unpack the packages")
fi

nvcc=""
if [ -n "${CUDACXX:-}" ]; then
  if [ -x "$CUDACXX" ]; then nvcc=$CUDACXX; else missing_gpu+=("nvcc: CUDACXX names $CUDACXX, which is not an executable"); fi
elif command -v nvcc >/dev/null 2>&1; then
  nvcc=$(command -v nvcc)
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  nvcc=/usr/local/cuda/bin/nvcc
else
  missing_gpu+=("nvcc (the CUDA compiler): not on PATH nor in /usr/local/cuda/bin")
fi
device_names=""
if ! command -v nvidia-smi >/dev/null 2>&1; then
  missing_gpu+=("no CUDA device: nvidia-smi (the NVIDIA driver's tool) is not installed")
else
  device_names=$(nvidia-smi -L 2>&1 | grep -E '^GPU [0-9]+:' || true)
  [ -z "$device_names" ] && missing_gpu+=("no CUDA device: nvidia-smi lists none ($(nvidia-smi -L 2>&1 | head -n 1))")
fi

# LibTorch: the directory holding TorchConfig.cmake.
torch_info=$("$python" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.utils.cmake_prefix_path)' 2>/dev/null | tail -n 1)
read -r py_torch_version py_torch_cuda py_torch_device py_torch_prefix <<<"${torch_info:-none None False none}"
torch_dir=""
if [ -z "$torch_prefix" ]; then
  if [ -z "$torch_info" ]; then
    missing+=("LibTorch: $python cannot import torch, and no --torch-prefix was given")
  else
    torch_prefix=$py_torch_prefix
  fi
fi
if [ -n "$torch_prefix" ]; then
  if [ -f "$torch_prefix/Torch/TorchConfig.cmake" ]; then
    torch_dir=$(cd "$torch_prefix/Torch" && pwd)
  elif [ -f "$torch_prefix/TorchConfig.cmake" ]; then
    torch_dir=$(cd "$torch_prefix" && pwd)
  else
    missing+=("LibTorch: no Torch/TorchConfig.cmake under $torch_prefix (give --torch-prefix DIR)")
  fi
fi
torch_line="${torch_dir:-missing}; $python: torch ${py_torch_version} (CUDA ${py_torch_cuda}, device ${py_torch_device})"

{
  echo "date: $(ts)"
  echo "host: $(uname -a)"
  grep -E '^PRETTY_NAME=' /etc/os-release 2>/dev/null
  echo "cores: $(nproc)"
  grep -m1 'model name' /proc/cpuinfo 2>/dev/null
  free -g 2>/dev/null | head -n 2
  df -h . 2>/dev/null | tail -n 1
  echo
  echo "c++: $(${CXX:-c++} --version 2>&1 | head -n 1)"
  echo "glibc: $(ldd --version 2>&1 | head -n 1)"
  echo "libstdc++: $(ls /usr/lib/x86_64-linux-gnu/libstdc++.so.6.* 2>/dev/null | head -n 1)"
  echo "cmake: $(cmake --version 2>&1 | head -n 1)"
  echo "ninja: $(ninja --version 2>&1 || echo missing)"
  echo "dpkg-deb: $(dpkg-deb --version 2>&1 | head -n 1)"
  echo "nvcc: ${nvcc:-missing}"; [ -n "$nvcc" ] && "$nvcc" --version 2>&1 | tail -n 2
  echo "python: $(command -v "$python"): $torch_info"
  echo "LibTorch CMake files: ${torch_dir:-missing}"
  echo
  echo "carried: $carry"
  [ -f "$carry/MANIFEST" ] && cat "$carry/MANIFEST"
  echo
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
    echo
    nvidia-smi 2>&1
  else
    echo "nvidia-smi: missing"
  fi
} >"$env_log" 2>&1

if [ -n "$device_names" ]; then
  q=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
  cuda_driver=$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | head -n 1)
  nvcc_version=$([ -n "$nvcc" ] && "$nvcc" --version | grep -o 'release [0-9.]*' | head -n 1)
  gpu_line="$q; ${cuda_driver:-CUDA version unknown} (driver); nvcc ${nvcc_version:-missing}"
fi
if [ "$py_torch_cuda" = None ] || [ -z "$py_torch_cuda" ]; then
  missing_gpu+=("a torch with CUDA: $python's torch is ${py_torch_version} without CUDA")
fi

if [ ${#missing[@]} -gt 0 ] || { [ ${#missing_gpu[@]} -gt 0 ] && [ $require_gpu = 1 ]; }; then
  for m in "${missing[@]}" "${missing_gpu[@]}"; do echo "gpu-node-check: MISSING: $m" >&2; done
  [ ${#missing_gpu[@]} -gt 0 ] && [ $require_gpu = 1 ] &&
    echo "gpu-node-check: this machine is supposed to have a GPU (--require-gpu): stopping." >&2
  record preflight "FAILED (missing)" 0 "$(join "${missing[@]}" "${missing_gpu[@]}")"
  finish
fi
if [ ${#missing_gpu[@]} -gt 0 ]; then
  for m in "${missing_gpu[@]}"; do echo "gpu-node-check: rehearsal without: $m" >&2; done
  record preflight ok 0 "rehearsal without: $(join "${missing_gpu[@]}")"
else
  record preflight ok 0 "$(echo "$device_names" | head -n 1); torch $py_torch_version CUDA $py_torch_cuda"
fi

# ---- 2. prefix -----------------------------------------------------------------
mkdir -p "$build"
prefix=$(cd "$build" && pwd)/prefix
case "$prefix" in
  /|/usr|/usr/*|/lib*|/opt|/etc*) echo "gpu-node-check: refusing to unpack into $prefix" >&2; exit 1 ;;
esac
libdirs="$prefix/usr/lib/x86_64-linux-gnu:$prefix/lib/x86_64-linux-gnu"

# Unpacks every carried package into $prefix (again when MANIFEST changed),
# repoints absolute links that name a file of the prefix (zlib1g-dev's
# libz.so -> /lib/x86_64-linux-gnu/libz.so.1.2.13) into it, and checks that
# its code generators run here.
unpack_prefix() {
  local stamp="$prefix/.manifest"
  if [ -f "$stamp" ] && cmp -s "$stamp" "$carry/MANIFEST"; then
    echo "prefix: $prefix already holds the packages of $carry/MANIFEST"
  else
    rm -rf "$prefix"
    mkdir -p "$prefix"
    local f
    for f in "$carry"/debs/*.deb; do
      if command -v dpkg-deb >/dev/null 2>&1; then
        dpkg-deb -x "$f" "$prefix" || return 1
      else
        local member
        member=$(ar t "$f" | grep '^data\.tar') || return 1
        ar p "$f" "$member" | tar -x -a -f - -C "$prefix" 2>/dev/null ||
          ar p "$f" "$member" | tar -xJ -C "$prefix" || return 1
      fi
      echo "unpacked $(basename "$f")"
    done
    local link target
    while IFS= read -r -d '' link; do
      target=$(readlink "$link")
      if [ -e "$prefix$target" ]; then
        ln -sfn "$prefix$target" "$link"
        echo "repointed $link -> $prefix$target"
      else
        echo "left $link -> $target (not in the prefix)"
      fi
    done < <(find "$prefix" -type l -lname '/*' -print0)
    # gRPC's Findre2 takes a CMake config of re2 first, else pkg-config
    # (which the device may lack, and whose re2.pc names /usr): give it one.
    local re2_cmake="$prefix/usr/lib/x86_64-linux-gnu/cmake/re2"
    mkdir -p "$re2_cmake"
    cat >"$re2_cmake/re2Config.cmake" <<EOF
# Written by scripts/gpu-node-check.sh: RE2 of the unpacked libre2-dev.
if(NOT TARGET re2::re2)
  add_library(re2::re2 SHARED IMPORTED)
  set_target_properties(re2::re2 PROPERTIES
    IMPORTED_LOCATION "$prefix/usr/lib/x86_64-linux-gnu/libre2.so"
    INTERFACE_INCLUDE_DIRECTORIES "$prefix/usr/include")
endif()
set(re2_FOUND TRUE)
EOF
    echo "wrote $re2_cmake/re2Config.cmake"
    cp "$carry/MANIFEST" "$stamp"
  fi
  echo "prefix: $(du -sh "$prefix" | cut -f1)"
  LD_LIBRARY_PATH=$libdirs "$prefix/usr/bin/protoc" --version || return 1
  LD_LIBRARY_PATH=$libdirs ldd "$prefix/usr/bin/grpc_cpp_plugin" || return 1
  if LD_LIBRARY_PATH=$libdirs ldd "$prefix/usr/bin/grpc_cpp_plugin" | grep -q 'not found'; then
    echo "grpc_cpp_plugin: a library is not found"
    return 1
  fi
}
run_stage prefix 90 "$prefix_log" -- bash -c "prefix='$prefix' carry='$carry' libdirs='$libdirs'
$(declare -f unpack_prefix); unpack_prefix"
if [ $stage_rc -ne 0 ]; then
  tail -n 20 "$prefix_log" >&2
  record prefix "$(status_of $stage_rc)" "$stage_seconds" "see prefix.txt"
  finish
fi
record prefix ok "$stage_seconds" "$(grep -c . "$carry/MANIFEST") packages; $(grep -m1 '^libprotoc' "$prefix_log")"

# The prefix's libraries for everything from here on: protoc during the
# build, the tests, the demo and the benchmark.
export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# pkg-config, where a find module asks it (FindOpenSSL's and FindCURL's
# hints), sees the prefix's files only, their /usr paths moved into it.
export PKG_CONFIG_LIBDIR="$prefix/usr/lib/x86_64-linux-gnu/pkgconfig:$prefix/usr/share/pkgconfig"
export PKG_CONFIG_SYSROOT_DIR="$prefix"

# ---- 3. configure ----------------------------------------------------------------
archs=${RETRACE_NODE_CUDA_ARCHS:-}
if [ -z "$archs" ] && [ -n "$device_names" ]; then
  archs=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
fi
generator=()
[ ! -f "$build/CMakeCache.txt" ] && command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
# The prefix first; its CMake folders as prefixes of their own too, so that
# the packages' config files are found whatever CMAKE_LIBRARY_ARCHITECTURE
# this compiler reports. LibTorch through Torch_DIR only: a prefix such as
# Debian's /usr/lib/x86_64-linux-gnu/cmake would hold every other package too.
cmake_args=(
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DRETRACE_BUILD_TESTS=ON -DRETRACE_BUILD_BENCH=ON
  "-DCMAKE_PREFIX_PATH=$prefix/usr;$prefix/usr/lib/x86_64-linux-gnu/cmake;$prefix/usr/share/cmake"
  "-DCMAKE_INCLUDE_PATH=$prefix/usr/include"
  # Multiarch headers (openssl/configuration.h): the compiler searches only
  # the system's /usr/include/x86_64-linux-gnu by itself.
  "-DCMAKE_CXX_STANDARD_INCLUDE_DIRECTORIES=$prefix/usr/include/x86_64-linux-gnu"
  "-DCMAKE_C_STANDARD_INCLUDE_DIRECTORIES=$prefix/usr/include/x86_64-linux-gnu"
  "-DCMAKE_LIBRARY_PATH=$prefix/usr/lib/x86_64-linux-gnu;$prefix/lib/x86_64-linux-gnu"
  "-DCMAKE_PROGRAM_PATH=$prefix/usr/bin"
  "-DProtobuf_PROTOC_EXECUTABLE=$prefix/usr/bin/protoc"
  "-DTorch_DIR=$torch_dir"
)
if [ -n "$nvcc" ]; then
  cmake_args+=(-DRETRACE_WITH_CUDA=ON "-DCMAKE_CUDA_COMPILER=$nvcc")
  [ -n "$archs" ] && cmake_args+=("-DCMAKE_CUDA_ARCHITECTURES=$archs")
else
  cmake_args+=(-DRETRACE_WITH_CUDA=OFF)
fi
if [ -n "${RETRACE_NODE_CMAKE_ARGS:-}" ]; then
  read -r -a extra_args <<<"$RETRACE_NODE_CMAKE_ARGS"
  cmake_args+=("${extra_args[@]}")
fi
run_stage configure 150 "$build_log" -- cmake -S . -B "$build" "${generator[@]}" "${cmake_args[@]}"
if [ $stage_rc -ne 0 ]; then
  grep -E 'CMake Error|Could not find|not found' "$build_log" | head -n 20 >&2
  record configure "$(status_of $stage_rc)" "$stage_seconds" "see build.log"
  finish
fi
cache="$build/CMakeCache.txt"
if [ -n "$nvcc" ] && ! grep -q '^RETRACE_WITH_CUDA:BOOL=ON' "$cache"; then
  record configure "FAILED (no CUDA)" "$stage_seconds" "the build did not enable CUDA"
  finish
fi
# Every package of the prefix must come from it: the cache entries that name
# where CMake found each one.
from_prefix=(absl_DIR gRPC_DIR prometheus-cpp_DIR civetweb_DIR nlohmann_json_DIR GTest_DIR
  benchmark_DIR tomlplusplus_DIR Protobuf_INCLUDE_DIR Protobuf_LIBRARY_RELEASE Protobuf_PROTOC_EXECUTABLE
  OPENSSL_INCLUDE_DIR OPENSSL_SSL_LIBRARY OPENSSL_CRYPTO_LIBRARY ZLIB_INCLUDE_DIR ZLIB_LIBRARY_RELEASE
  CURL_INCLUDE_DIR CURL_LIBRARY_RELEASE RETRACE_STB_LIBRARY RETRACE_STB_INCLUDE_DIR RETRACE_CLI11_INCLUDE_DIR)
not_from_prefix=()
for var in "${from_prefix[@]}"; do
  value=$(sed -n "s/^$var:[A-Z]*=//p" "$cache" | head -n 1)
  echo "cache: $var=$value" >>"$prefix_log"
  if [ -n "$value" ] && [[ "$value" != "$prefix"/* ]]; then not_from_prefix+=("$var=$value"); fi
done
# Where re2 and c-ares came from (gRPC's own find modules), and any library
# that pkg-config found.
grep -E '^(re2_DIR|c-ares_INCLUDE_DIR|c-ares_LIBRARY|pkgcfg_lib_[A-Za-z0-9_]*):(PATH|FILEPATH)=' "$cache" | while IFS= read -r line; do
  echo "cache: $line" >>"$prefix_log"
  [[ "${line#*=}" == "$prefix"/* ]] || echo "$line"
done >"$out/.not-from-prefix"
mapfile -t -O ${#not_from_prefix[@]} not_from_prefix <"$out/.not-from-prefix"
rm -f "$out/.not-from-prefix"
echo "cache: Torch_DIR=$(sed -n 's/^Torch_DIR:[A-Z]*=//p' "$cache")" >>"$prefix_log"
if [ ${#not_from_prefix[@]} -gt 0 ]; then
  printf 'gpu-node-check: not from the prefix: %s\n' "${not_from_prefix[@]}" >&2
  record configure "FAILED (not from prefix)" "$stage_seconds" "$(join "${not_from_prefix[@]}")"
  finish
fi
record configure ok "$stage_seconds" "${generator[*]:-existing generator}, CUDA archs ${archs:-none}; ${#from_prefix[@]} packages from the prefix"

# Prints the headers and libraries that the build took from elsewhere
# although the prefix holds the same file: /usr/include/grpcpp/grpcpp.h
# beside the prefix's include/grpcpp/grpcpp.h, a google/protobuf header of
# another include folder (a LibTorch that ships its own), a libprotobuf.so of
# the system. Headers come from ninja's dependency log, libraries from the
# link commands of targets $@ (all when none). On the device such files are
# absent or another version; on a rehearsal machine that has the packages
# installed they would hide a search path that misses the prefix. Ninja
# builds only.
system_files_used() {
  grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja' "$cache" || return 0
  local list="$build/.prefix-files"
  {
    (cd "$prefix/usr/include" && find . \( -type f -o -type l \)) | sed 's|^\./|include/|'
    (cd "$prefix" && find usr/lib lib -maxdepth 2 \( -type f -o -type l \) -name 'lib*' 2>/dev/null) | sed 's|.*/|lib/|'
  } >"$list"
  {
    (cd "$build" && ninja -t deps) | awk 'NF == 1 && substr($1, 1, 1) == "/" { print $1 }'
    (cd "$build" && ninja -t commands "$@") | tr ' ' '\n' | grep -E '^/.*/lib[^/]*\.(so|a)(\.[0-9.]+)?$'
  } | sort -u | awk -v prefix="$prefix/" -v list="$list" '
    BEGIN { while ((getline line < list) > 0) held[line] = 1 }
    index($0, prefix) == 1 { next }
    {
      path = $0
      # Headers: every tail after an "/include/" of the path.
      rest = path
      while ((i = index(rest, "/include/")) > 0) {
        rest = substr(rest, i + 9)
        if (("include/" rest) in held) { print path; next }
      }
      # Libraries: the file name.
      n = split(path, parts, "/")
      if (parts[n] ~ /^lib/ && ("lib/" parts[n]) in held) print path
    }' | head -n 20
  rm -f "$list"
}

# ---- 4. build --------------------------------------------------------------------
keep_going=()
if grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja' "$cache"; then keep_going=(-- -k 0); else keep_going=(-- -k); fi
# What the later stages run: the tests labelled gpu (named in the
# gtest_discover_tests calls of build.ninja), the three programs and the
# server benchmark.
gpu_targets=$(grep -rhoE 'TEST_TARGET=[A-Za-z0-9_]+ [^"]*"TEST_PROPERTIES=[^"]*"' \
  --include=build.ninja --include='*.make' "$build" 2>/dev/null |
  grep -E 'LABELS;([^;"]*;)*gpu(;|")' | sed -E 's/^TEST_TARGET=([A-Za-z0-9_]+) .*/\1/' | sort -u)
targets=(retrace-batch retraced retrace $gpu_targets)
grep -q 'server_bench' "$build/build.ninja" "$build/Makefile" 2>/dev/null && targets+=(server_bench)
if [ $build_all_first = 1 ]; then target_args=(); else target_args=(--target "${targets[@]}"); fi
echo "gpu-labelled test targets: $(echo $gpu_targets)" >>"$build_log"
run_stage build 330 "$build_log" -- "${nice_cmd[@]}" cmake --build "$build" -j "$jobs" "${target_args[@]}" "${keep_going[@]}"
build_rc=$stage_rc
build_note="-j $jobs, $([ $build_all_first = 1 ] && echo 'the whole tree' || echo "${#targets[@]} targets: $(echo "${targets[@]}")")"
leaks=""
[ $build_rc -eq 0 ] && leaks=$(system_files_used "${targets[@]}")
if [ -n "$leaks" ]; then
  echo "system files that the prefix also holds were used:" >>"$build_log"
  echo "$leaks" >>"$build_log"
  record build "FAILED (system files used)" "$stage_seconds" "$(join "$leaks")"
elif [ $build_rc -ne 0 ]; then
  grep -E 'error|FAILED' "$build_log" | head -n 20 >&2
  record build "$(status_of $build_rc)" "$stage_seconds" "$build_note; kept going; see build.log"
  timed_out $build_rc && finish
else
  record build ok "$stage_seconds" "$build_note; no system header or library that the prefix holds was used"
fi

# ---- 5. ctest -L gpu ---------------------------------------------------------------
run_stage ctest 150 "$ctest_log" -- ctest --test-dir "$build" -L gpu -j 4 -V --timeout 300
ctest_rc=$stage_rc
total=$(grep -oE 'tests failed out of [0-9]+' "$ctest_log" | grep -oE '[0-9]+$' | tail -n 1)
failed_n=$(grep -oE '[0-9]+ tests failed out of' "$ctest_log" | grep -oE '^[0-9]+' | tail -n 1)
skipped=$(grep -cE '^([0-9]+: )?\[  SKIPPED \] [A-Za-z0-9_/.]+ \([0-9]+ ms\)' "$ctest_log")
not_run=$(sed -n '/The following tests did not run:/,/^$/p' "$ctest_log" | grep -cE '^\s+[0-9]+ - ')
total=${total:-0}
failed_n=${failed_n:-0}
[ "$not_run" -gt "$skipped" ] && skipped=$not_run
# A gpu test whose executable was not built is not listed by -L gpu at all:
# each one must have had its tests discovered.
not_built=0
for t in $gpu_targets; do
  if [ -z "$(find "$build" -name "$t\[1\]_tests.cmake" -print -quit 2>/dev/null)" ]; then
    echo "gpu test $t was not built" >>"$ctest_log"
    not_built=$((not_built + 1))
  fi
done
test_line="$((total - failed_n - skipped)) passed, $failed_n failed, $skipped skipped or not run, of $total"
if timed_out $ctest_rc; then
  record ctest "$(status_of $ctest_rc)" "$stage_seconds" "$test_line"
elif [ "$total" -eq 0 ]; then
  record ctest "FAILED (no gpu tests)" "$stage_seconds" "ctest -L gpu found no test"
elif [ "$not_built" -gt 0 ]; then
  record ctest "FAILED (not built)" "$stage_seconds" "$test_line; a gpu test executable was not built"
elif [ $ctest_rc -ne 0 ] || [ "$failed_n" -ne 0 ]; then
  grep -E '^\s*[0-9]+ - .*\(Failed|\*\*\*' "$ctest_log" | head -n 20 >&2
  record ctest "$(status_of "$([ $ctest_rc -ne 0 ] && echo $ctest_rc || echo 1)")" "$stage_seconds" "$test_line"
elif [ "$skipped" -gt 0 ] && [ $require_gpu = 1 ]; then
  grep -E 'SKIPPED|Skipped' "$ctest_log" | head -n 10 >&2
  record ctest "FAILED (tests skipped)" "$stage_seconds" "$test_line: a gpu test did not run on the device"
else
  record ctest ok "$stage_seconds" "$test_line"
fi

# ---- 6. demo -------------------------------------------------------------------------
demo_args=(--no-build --offline --fresh)
[ $quick = 1 ] && demo_args+=(--quick)
run_stage demo 200 "$demo_log" -- env RETRACE_BUILD_DIR="$build" \
  RETRACE_FASHION_MNIST_DIR="$(cd "$carry" 2>/dev/null && pwd)/data/fashion-mnist" \
  RETRACE_DEMO_DIR="$build/demo-node" bash scripts/demo.sh "${demo_args[@]}"
if [ $stage_rc -eq 0 ]; then
  record demo ok "$stage_seconds" "$(grep -m1 -E '^timings:' "$demo_log")"
else
  tail -n 20 "$demo_log" >&2
  record demo "$(status_of $stage_rc)" "$stage_seconds" "see demo.log"
fi

# ---- 7. the server benchmark ----------------------------------------------------------
bench_args=()
[ $quick = 1 ] && bench_args=(--seconds 1 --rounds 3 --soak-windows 2 --n 5000)
# bench.sh configures its build folder with Release and no tests; the same
# folder keeps this build's type and tests (the later -D wins).
run_stage bench 180 "$bench_log" -- env RETRACE_BENCH_BUILD_DIR="$build" RETRACE_BENCH_SKIP_SETUP=1 \
  RETRACE_BENCH_CMAKE_ARGS="-DCMAKE_BUILD_TYPE=RelWithDebInfo -DRETRACE_BUILD_TESTS=ON -DRETRACE_BUILD_BENCH=ON" \
  bash scripts/bench.sh server -- "${bench_args[@]}"
if [ $stage_rc -eq 0 ]; then
  record bench ok "$stage_seconds" "$(grep -E '^RATIO ' "$bench_log" | sort -u | tr '\n' ' ')"
else
  tail -n 20 "$bench_log" >&2
  record bench "$(status_of $stage_rc)" "$stage_seconds" "see bench.txt"
fi

# ---- 8. the rest of the tree ----------------------------------------------------------
if [ $build_all_first = 1 ]; then
  stage_started=$(ts)
  record build-all ok 0 "built in stage build"
else
  run_stage build-all 600 "$build_log" -- "${nice_cmd[@]}" cmake --build "$build" -j "$jobs" "${keep_going[@]}"
  leaks=""
  [ $stage_rc -eq 0 ] && leaks=$(system_files_used)
  if [ -n "$leaks" ]; then
    echo "system files that the prefix also holds were used:" >>"$build_log"
    echo "$leaks" >>"$build_log"
    record build-all "FAILED (system files used)" "$stage_seconds" "$(join "$leaks")"
  elif [ $stage_rc -eq 0 ]; then
    record build-all ok "$stage_seconds" "the whole tree (every test and benchmark); no system header or library that the prefix holds was used"
  else
    record build-all "$(status_of $stage_rc)" "$stage_seconds" "see build.log"
  fi
fi

finish
