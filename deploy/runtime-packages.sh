#!/usr/bin/env bash
# Prints the Debian packages that provide the shared libraries the given ELF
# binaries link directly (their DT_NEEDED entries), one per line, sorted.
# The Dockerfile's build stage runs it on retraced, retrace and retrace-batch
# and the runtime stage installs exactly that list (apt adds what those
# packages depend on), so the runtime image never drifts from what was linked.
#
#   deploy/runtime-packages.sh [--provided DIR]... BINARY...
#
# --provided DIR: libraries that resolve under DIR are not looked up; the
# image provides them itself (Dockerfile.gpu copies PyTorch's CUDA LibTorch
# and the NVIDIA libraries it bundles, which no Debian package owns, and
# checks with ldd in the runtime stage that every library resolves).
#
# The NVIDIA driver's libcuda.so.1 and libnvidia-ml.so.1 are never listed (the
# container runtime mounts the host's). Exit status 1, naming the library,
# when a needed library is not found or is not owned by any installed package
# (e.g. something under /usr/local, which the runtime image would lack).
set -euo pipefail

provided=()
while [ $# -gt 0 ] && [ "$1" = "--provided" ]; do
  if [ $# -lt 2 ]; then
    echo "usage: $0 [--provided DIR]... BINARY..." >&2
    exit 2
  fi
  dir=$(readlink -m "$2")
  provided+=("${dir%/}")
  shift 2
done
if [ $# -eq 0 ]; then
  echo "usage: $0 [--provided DIR]... BINARY..." >&2
  exit 2
fi

# Whether a library path lies under one of the --provided directories.
is_provided() {
  local path dir
  path=$(readlink -m "$1")
  for dir in "${provided[@]}"; do
    case "$path/" in "$dir"/*) return 0 ;; esac
    case "$1/" in "$dir"/*) return 0 ;; esac
  done
  return 1
}

# dpkg records a file under the path its package shipped it at. On Debian 12
# /lib is a symbolic link to /usr/lib and alternatives (libblas.so.3) are
# links into /etc/alternatives, so try the path as ldd printed it, the same
# path with or without the /usr prefix, and the fully resolved path.
owner() {
  local path=$1 candidate resolved
  resolved=$(readlink -f "$path")
  for candidate in "$path" "/usr$path" "${path#/usr}" "$resolved" "/usr$resolved" "${resolved#/usr}"; do
    if out=$(dpkg-query -S "$candidate" 2>/dev/null); then
      # "libfoo1:amd64: /usr/lib/..." -> "libfoo1"; a diversion line starts
      # with "diversion by", which never matches a shared library here.
      echo "${out%%:*}" | head -n 1
      return 0
    fi
  done
  return 1
}

status=0
packages=()
for binary in "$@"; do
  if [ ! -f "$binary" ]; then
    echo "runtime-packages: $binary: no such file" >&2
    exit 1
  fi
  mapfile -t needed < <(objdump -p "$binary" | awk '$1 == "NEEDED" {print $2}')
  ldd_out=$(ldd "$binary")
  for lib in "${needed[@]}"; do
    # The NVIDIA driver's libraries come from the host: the NVIDIA Container
    # Toolkit mounts them into the container, and an image must not carry a
    # driver package of its own (nor can it know the host's driver version).
    case "$lib" in
      libcuda.so.1|libnvidia-ml.so.1) continue ;;
    esac
    path=$(awk -v lib="$lib" '$1 == lib && $2 == "=>" {print $3}' <<<"$ldd_out")
    if [ -z "$path" ] || [ "$path" = "not" ]; then
      # The dynamic loader itself has no "=>" line; it comes with libc6.
      case "$lib" in
        ld-linux*) packages+=(libc6); continue ;;
      esac
      echo "runtime-packages: $binary needs $lib, which is not found" >&2
      status=1
      continue
    fi
    if [ ${#provided[@]} -gt 0 ] && is_provided "$path"; then
      continue
    fi
    if ! pkg=$(owner "$path"); then
      echo "runtime-packages: $binary needs $lib ($path), which no package owns" >&2
      status=1
      continue
    fi
    packages+=("$pkg")
  done
done
[ $status -eq 0 ] || exit $status
[ ${#packages[@]} -gt 0 ] || exit 0
printf '%s\n' "${packages[@]}" | sort -u
