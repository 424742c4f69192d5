#!/usr/bin/env bash
# Collects, on this (networked, Debian bookworm) machine, what
# scripts/gpu-node-check.sh needs to build the whole project on a GPU machine
# that has CUDA, CMake and PyTorch but no gRPC, protobuf, abseil or other
# development packages, and no network:
#   debs/   the Debian packages of the full build, as downloaded by
#           `apt-get download` (compressed; the check unpacks them with
#           dpkg -x into a prefix of its own, never over /)
#   data/fashion-mnist/   a trimmed copy of Fashion-MNIST for the demo (the
#           first 1,000 T-shirts and 100 trousers of the training set, the
#           first 20 test T-shirts): the dataset package is 30 MB
#   MANIFEST  one line per package: name, version, file, bytes
# into OUT_DIR (default third_party-node, ignored by git; the device run
# names it in `carry`). Ends with the sizes, and fails when the folder is over
# its budget (RETRACE_NODE_DEBS_BUDGET_MIB, default 40 MiB) or when what
# travels to the device (the working tree that git does not ignore, plus
# this folder and third_party-gpu/) would be over RETRACE_NODE_TOTAL_BUDGET_MIB
# (default 60 MiB: the device tool takes 64 MiB at most).
#
#   scripts/gpu-node-prepare.sh [OUT_DIR]
#   scripts/gpu-node-prepare.sh --check-only [OUT_DIR]   sizes and budgets only
#
# Which packages: what the top-level find_package calls need (CMake config
# files, headers, the .so links) and what those libraries load at run time,
# down to libc/libstdc++ (which the device has). The list is fixed below, and
# the script checks that every ELF file it unpacks finds its libraries in the
# unpacked tree or in glibc/libstdc++ (all but libcurl, which only
# prometheus-cpp's push library loads; retrace links neither).
set -euo pipefail
cd "$(dirname "$0")/.."

check_only=0
out=""
for arg in "$@"; do
  case "$arg" in
    --check-only) check_only=1 ;;
    -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "usage: scripts/gpu-node-prepare.sh [--check-only] [OUT_DIR]" >&2; exit 2 ;;
    *) out=$arg ;;
  esac
done
out=${out:-third_party-node}
debs_budget_mib=${RETRACE_NODE_DEBS_BUDGET_MIB:-40}
total_budget_mib=${RETRACE_NODE_TOTAL_BUDGET_MIB:-60}

packages=(
  # gRPC: headers, CMake config (cmake/grpc), libraries, grpc_cpp_plugin
  libgrpc++-dev libgrpc-dev libgrpc++1.51 libgrpc29 protobuf-compiler-grpc
  # protobuf: headers, libraries, protoc (FindProtobuf; gRPC's config)
  libprotobuf-dev libprotobuf32 libprotobuf-lite32 protobuf-compiler libprotoc32
  # abseil (Status, strings, containers; gRPC's too)
  libabsl-dev libabsl20220623
  # gRPC's dependencies: c-ares, RE2, OpenSSL, zlib (the runtime libraries
  # too: the -dev .so links point at them)
  libc-ares-dev libc-ares2 libre2-dev libre2-9 libssl-dev libssl3 zlib1g-dev zlib1g
  # header-only or small libraries of the server, jobs and client
  nlohmann-json3-dev libcli11-dev libtomlplusplus-dev libtomlplusplus3 libstb-dev libstb0
  # query image decoding
  libpng-dev libpng16-16 libjpeg62-turbo-dev libjpeg62-turbo
  # prometheus-cpp (metrics); its config finds civetweb (whose targets name
  # the civetweb program) and CURL (the push library, which retrace does not
  # link: the .so only has to exist for find_package(CURL))
  prometheus-cpp-dev libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0
  libprometheus-cpp-push1.0 libcivetweb-dev libcivetweb1 civetweb
  libcurl4-openssl-dev libcurl4
  # tests and benchmarks (server_bench needs Google Benchmark)
  libgtest-dev libgmock-dev libbenchmark-dev libbenchmark1debian
)

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
bytes_of() { du -sb "$1" 2>/dev/null | cut -f1; }

if [ $check_only = 0 ]; then
  command -v apt-get >/dev/null || { echo "gpu-node-prepare: apt-get is missing (a Debian machine is needed)" >&2; exit 1; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "gpu-node-prepare: apt-get download ${#packages[@]} packages" >&2
  mkdir -p "$tmp/debs"
  if ! (cd "$tmp/debs" && apt-get download "${packages[@]}" >"$tmp/apt.log" 2>&1); then
    cat "$tmp/apt.log" >&2
    echo "gpu-node-prepare: apt-get download failed (run apt-get update first?)" >&2
    exit 1
  fi
  {
    for f in "$tmp"/debs/*.deb; do
      printf '%s %s %s %s\n' "$(dpkg-deb -f "$f" Package)" "$(dpkg-deb -f "$f" Version)" \
        "$(basename "$f")" "$(stat -c %s "$f")"
    done
  } | sort >"$tmp/MANIFEST"
  got=$(wc -l <"$tmp/MANIFEST")
  if [ "$got" -ne ${#packages[@]} ]; then
    echo "gpu-node-prepare: got $got packages, wanted ${#packages[@]}" >&2
    exit 1
  fi

  # Every ELF file of the unpacked tree must find its libraries there or in
  # glibc/libstdc++/libgcc, except libcurl and prometheus-cpp's push library
  # (which loads libcurl): nothing of retrace links them, so their
  # dependencies stay behind. Anything else missing is a package to add.
  dpkg_root="$tmp/root"
  for f in "$tmp"/debs/*.deb; do dpkg -x "$f" "$dpkg_root"; done
  libdirs="$dpkg_root/usr/lib/x86_64-linux-gnu:$dpkg_root/lib/x86_64-linux-gnu"
  base_re='^(libc|libm|libdl|librt|libpthread|libresolv|libstdc\+\+|libgcc_s|ld-linux-x86-64|linux-vdso)\.so'
  unlinked_re='/(libcurl|libprometheus-cpp-push)\.so'
  outside=$(find "$dpkg_root" -type f \( -name '*.so*' -o -path '*/bin/*' \) -print0 |
    while IFS= read -r -d '' f; do
      head -c 4 "$f" | grep -q 'ELF' || continue
      LD_LIBRARY_PATH=$libdirs ldd "$f" 2>/dev/null | awk -v root="$dpkg_root" -v f="${f#"$dpkg_root"}" \
        '/=>/ && index($3, root) != 1 { print f, $1 }'
    done | awk -v re="$base_re" '$2 !~ re' | sort -u)
  missing_libs=$(grep -vE "$unlinked_re" <<<"$outside" | grep . || true)
  if [ -n "$missing_libs" ]; then
    echo "gpu-node-prepare: FAIL: these files load libraries that no listed package holds:" >&2
    sed 's/^/  /' <<<"$missing_libs" >&2
    exit 1
  fi
  curl_deps=$(awk '{ print $2 }' <<<"$outside" | sort -u | tr '\n' ' ')
  data_src=/usr/share/datasets/fashion-mnist
  if [ ! -f "$data_src/train-images-idx3-ubyte.gz" ]; then
    echo "gpu-node-prepare: downloading dataset-fashion-mnist for the demo's images" >&2
    (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null 2>&1) || {
      echo "gpu-node-prepare: apt-get download dataset-fashion-mnist failed" >&2; exit 1; }
    dpkg -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/fm"
    data_src="$tmp/fm/usr/share/datasets/fashion-mnist"
  fi
  mkdir -p "$tmp/data/fashion-mnist"
  python3 - "$data_src" "$tmp/data/fashion-mnist" <<'EOF'
# Keeps, in file order, the first 1,000 T-shirts (0) and 100 trousers (1) of
# the training split and the first 20 T-shirts of the test split: what
# scripts/demo.sh reads (1,000 T-shirts, 3.8% planted trousers, a held-out
# test T-shirt), in the same IDX format, gzip-compressed.
import gzip, struct, sys
src, dst = sys.argv[1], sys.argv[2]
keep = {"train": {0: 1000, 1: 100}, "t10k": {0: 20}}
for split, quota in keep.items():
    with gzip.open(f"{src}/{split}-images-idx3-ubyte.gz", "rb") as f:
        images = f.read()
    with gzip.open(f"{src}/{split}-labels-idx1-ubyte.gz", "rb") as f:
        labels = f.read()
    _, n, rows, cols = struct.unpack(">IIII", images[:16])
    size = rows * cols
    taken = {c: 0 for c in quota}
    chosen = []
    for i in range(n):
        c = labels[8 + i]
        if c in quota and taken[c] < quota[c]:
            taken[c] += 1
            chosen.append(i)
    body = b"".join(images[16 + i * size:16 + (i + 1) * size] for i in chosen)
    with open(f"{dst}/{split}-images-idx3-ubyte.gz", "wb") as f:
        f.write(gzip.compress(
            struct.pack(">IIII", 2051, len(chosen), rows, cols) + body, mtime=0))
    with open(f"{dst}/{split}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(gzip.compress(
            struct.pack(">II", 2049, len(chosen)) + bytes(labels[8 + i] for i in chosen),
            mtime=0))
    print(f"gpu-node-prepare: fashion-mnist {split}: {taken}", file=sys.stderr)
EOF

  rm -rf "$out/debs" "$out/data" "$out/MANIFEST"
  mkdir -p "$out"
  mv "$tmp/debs" "$out/debs"
  mv "$tmp/data" "$out/data"
  mv "$tmp/MANIFEST" "$out/MANIFEST"
  cat >"$out/README" <<EOF
Build inputs for scripts/gpu-node-check.sh on a GPU machine without network
or development packages, collected by scripts/gpu-node-prepare.sh on
$(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME") (not tracked by git).
debs/: the Debian packages listed in MANIFEST (unpacked there with dpkg -x
into a prefix of their own). data/: a trimmed Fashion-MNIST for the demo.
Every unpacked program and library finds its libraries in the unpacked tree
or in glibc/libstdc++, except libcurl (which retrace does not link: it is
there for find_package(CURL) in prometheus-cpp's config), whose own
dependencies stay behind: ${curl_deps:-none}
EOF
  echo "gpu-node-prepare: every unpacked ELF file finds its libraries in the prefix or glibc/libstdc++" \
    "(libcurl's own dependencies left behind: ${curl_deps:-none})"
fi

[ -f "$out/MANIFEST" ] || { echo "gpu-node-prepare: $out/MANIFEST is missing (run without --check-only)" >&2; exit 1; }
folder_bytes=$(bytes_of "$out")
gpu_bytes=0
[ -d third_party-gpu ] && gpu_bytes=$(bytes_of third_party-gpu)
# The working tree that travels: tracked and untracked-not-ignored files.
tree_bytes=0
if git rev-parse --git-dir >/dev/null 2>&1; then
  tree_bytes=$(git ls-files -z --cached --others --exclude-standard |
    xargs -0 -r stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
fi
total_bytes=$((folder_bytes + gpu_bytes + tree_bytes))
echo "gpu-node-prepare: $out: $(wc -l <"$out/MANIFEST") packages, $(mib "$folder_bytes") MiB" \
  "(budget $debs_budget_mib MiB)"
echo "gpu-node-prepare: what travels: working tree $(mib "$tree_bytes") MiB + $out" \
  "$(mib "$folder_bytes") MiB + third_party-gpu $(mib "$gpu_bytes") MiB = $(mib "$total_bytes") MiB" \
  "(budget $total_budget_mib MiB of the device's 64)"
status=0
if [ "$folder_bytes" -gt $((debs_budget_mib * 1048576)) ]; then
  echo "gpu-node-prepare: FAIL: $out is $(mib "$folder_bytes") MiB, over its budget of $debs_budget_mib MiB" >&2
  status=1
fi
if [ "$total_bytes" -gt $((total_budget_mib * 1048576)) ]; then
  echo "gpu-node-prepare: FAIL: what travels is $(mib "$total_bytes") MiB, over the budget of $total_budget_mib MiB" >&2
  status=1
fi
exit $status
