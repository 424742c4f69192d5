#!/usr/bin/env bash
# Installs every build and runtime dependency of retrace from Debian's packages.
# Non-interactive and idempotent: when everything is present it prints nothing.
#
#   scripts/setup.sh                  everything
#   scripts/setup.sh --without-torch  everything but Debian's (CPU-only)
#                                     LibTorch, for builds against another
#                                     LibTorch (Dockerfile.gpu: PyTorch's CUDA
#                                     wheel), which must not meet Debian's
#                                     headers and libraries on the same paths
set -euo pipefail

without_torch=0
case "${1:-}" in
  "") ;;
  --without-torch) without_torch=1 ;;
  *) echo "usage: $0 [--without-torch]" >&2; exit 2 ;;
esac

packages=(
  build-essential cmake ninja-build pkg-config git ca-certificates
  libgtest-dev libgmock-dev libbenchmark-dev
  libabsl-dev libssl-dev nlohmann-json3-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  prometheus-cpp-dev libcli11-dev libtomlplusplus-dev libstb-dev
  libtorch-dev libopenblas0-pthread python3 python3-numpy python3-torch python3-matplotlib
  zlib1g-dev libpng-dev libjpeg62-turbo-dev
  dataset-fashion-mnist fonts-dejavu-core
  prometheus docker-compose python3-grpcio python3-protobuf openssl
  python3-jsonschema python3-yaml
)

# kubectl renders deploy/k8s in the tests. Debian's kubernetes-client ships
# /usr/bin/kubectl, and so do Google's and Kubernetes' own packages: dpkg
# refuses to unpack one over another, so any kubectl already installed is kept.
if ! command -v kubectl >/dev/null 2>&1; then
  packages+=(kubernetes-client)
fi

if [ $without_torch -eq 1 ]; then
  kept=()
  for p in "${packages[@]}"; do
    case "$p" in libtorch-dev|python3-torch) ;; *) kept+=("$p") ;; esac
  done
  packages=("${kept[@]}")
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
