#!/usr/bin/env bash
# The retrace CLI links neither the kernels nor CUDA nor LibTorch: a user can
# install it on a laptop. Checked on the built binary:
#   - ldd lists no CUDA runtime, driver, cuBLAS or LibTorch library (and does
#     list gRPC, so the listing is real);
#   - its symbols hold nothing from retrace::kernels.
# usage: cli_links_test.sh PATH_TO_RETRACE
set -euo pipefail
cli=$1
[ -x "$cli" ] || { echo "FAIL: $cli is not an executable" >&2; exit 1; }

libs=$(ldd "$cli")
if ! grep -q 'libgrpc' <<<"$libs"; then
  echo "FAIL: ldd $cli lists no libgrpc; the check below would prove nothing:" >&2
  echo "$libs" >&2
  exit 1
fi
forbidden=$(grep -E 'libcudart|libcuda\.|libcublas|libnvrtc|libtorch|libc10' <<<"$libs" || true)
if [ -n "$forbidden" ]; then
  echo "FAIL: $cli links GPU or LibTorch libraries:" >&2
  echo "$forbidden" >&2
  exit 1
fi

symbols=$(nm -C "$cli" 2>/dev/null || true)
if [ -z "$symbols" ]; then
  echo "FAIL: nm found no symbols in $cli" >&2
  exit 1
fi
kernel_symbols=$(grep -E 'retrace::kernels::|cuda[A-Z][a-zA-Z]*@' <<<"$symbols" | head -5 || true)
if [ -n "$kernel_symbols" ]; then
  echo "FAIL: $cli contains kernel or CUDA symbols, e.g.:" >&2
  echo "$kernel_symbols" >&2
  exit 1
fi
echo "ok: $(wc -l <<<"$libs") shared libraries, none of CUDA or LibTorch; no kernel symbols"
