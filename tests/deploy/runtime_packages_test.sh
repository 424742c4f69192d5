#!/usr/bin/env bash
# deploy/runtime-packages.sh, which picks the runtime image's packages, checked
# against dpkg's own record: for /usr/bin/protoc it must name exactly the
# packages of protobuf-compiler's Depends field (which dpkg-shlibdeps derived
# from the same NEEDED entries when Debian built the package). On LibTorch's
# library, whose NEEDED entries include an alternatives link (libblas.so.3)
# and the dynamic loader, every name must be an installed package.
set -euo pipefail
src=${RETRACE_SOURCE_DIR:?RETRACE_SOURCE_DIR must name the repository}
script="$src/deploy/runtime-packages.sh"

for tool in dpkg-query objdump ldd; do
  if ! command -v "$tool" >/dev/null; then
    echo "SKIPPED: $tool is not installed (the script needs a Debian system with binutils)"
    exit 77
  fi
done
if ! dpkg-query -W -f='${Status}' protobuf-compiler 2>/dev/null | grep -q 'install ok installed'; then
  echo "SKIPPED: protobuf-compiler is not installed"
  exit 77
fi

fail() { echo "FAIL: $*" >&2; exit 1; }

got=$(bash "$script" /usr/bin/protoc)
want=$(dpkg-query -W -f='${Depends}' protobuf-compiler | tr ',' '\n' |
       sed -e 's/(.*)//' -e 's/|.*//' -e 's/ //g' -e '/^$/d' | sort -u)
[ "$got" = "$want" ] || fail "protoc: got [$(echo $got)], dpkg says [$(echo $want)]"
echo "protoc: $(echo $got)"

ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
torch_lib=$("$ldconfig" -p 2>/dev/null | awk '/libtorch_cpu\.so/ && !found {print $NF; found = 1}' || true)
if [ -n "$torch_lib" ]; then
  got=$(bash "$script" "$torch_lib") || fail "runtime-packages.sh failed on $torch_lib"
  for p in $got; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
      fail "$torch_lib: '$p' is not an installed package"
  done
  echo "$torch_lib: $(echo $got)"
  echo "$got" | grep -qx libc6 || fail "$torch_lib: the dynamic loader's package libc6 is missing"
else
  echo "libtorch_cpu.so not installed: alternatives case not exercised"
fi

# --provided (Dockerfile.gpu): a library resolved under a provided directory
# is left out, and without --provided a library no package owns is an error.
# protoc's libprotoc is copied into a directory of its own and found there
# through LD_LIBRARY_PATH, as the GPU image's LibTorch is found outside dpkg.
libprotoc=$(ldd /usr/bin/protoc | awk '$1 ~ /^libprotoc\.so/ {print $1, $3}')
if [ -n "$libprotoc" ]; then
  read -r libprotoc_name libprotoc_path <<<"$libprotoc"
  libprotoc_pkg=$(bash "$script" /usr/bin/protoc | grep '^libprotoc' || true)
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  cp "$libprotoc_path" "$tmp/$libprotoc_name"
  if LD_LIBRARY_PATH="$tmp" bash "$script" /usr/bin/protoc >/dev/null 2>&1; then
    fail "a library that no package owns must be an error without --provided"
  fi
  got=$(LD_LIBRARY_PATH="$tmp" bash "$script" --provided "$tmp" /usr/bin/protoc) ||
    fail "--provided $tmp: runtime-packages.sh failed"
  want_provided=$(echo "$want" | grep -vx "$libprotoc_pkg")
  [ "$got" = "$want_provided" ] ||
    fail "--provided: got [$(echo $got)], want [$(echo $want_provided)]"
  echo "protoc with $libprotoc_name provided: $(echo $got)"
  # Everything provided: no package, and no empty line either.
  got=$(bash "$script" --provided / /usr/bin/protoc)
  [ -z "$got" ] || fail "--provided /: expected no package, got [$(echo $got)]"
fi

if bash "$script" /nonexistent/binary 2>/dev/null; then
  fail "a missing binary must be an error"
fi
if bash "$script" 2>/dev/null; then
  fail "no argument must be a usage error"
fi
if bash "$script" --provided 2>/dev/null; then
  fail "--provided without a directory must be a usage error"
fi
echo "PASS"
