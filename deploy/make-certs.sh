#!/usr/bin/env bash
# Makes a small private CA and, signed by it, a server certificate for
# retraced and a client certificate for mutual TLS (docs/operations.md, "TLS
# and mutual TLS"). Keys are ECDSA P-256; files are PEM.
#
#   deploy/make-certs.sh OUT_DIR [NAME...]
#
# OUT_DIR receives
#   ca.pem, ca.key          the CA (keep ca.key offline; give ca.pem to clients,
#                           and to retraced as --tls-client-ca for mTLS)
#   server.pem, server.key  retraced's --tls-cert / --tls-key
#   client.pem, client.key  a client's certificate and key (mTLS)
# The server certificate is valid for localhost, 127.0.0.1, retraced (the
# docker-compose service name) and every NAME given (a DNS name, or an IPv4
# address). DAYS (environment, default 365) sets the leaf certificates'
# validity; the CA's is ten times that. Existing files are never overwritten:
# the script stops, naming the first one.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 OUT_DIR [NAME...]" >&2
  exit 2
fi
out=$1
shift
days=${DAYS:-365}

mkdir -p "$out"
for f in ca.pem ca.key server.pem server.key client.pem client.key; do
  if [ -e "$out/$f" ]; then
    echo "make-certs: $out/$f exists; remove it or choose another directory" >&2
    exit 1
  fi
done

san="DNS:localhost,IP:127.0.0.1,DNS:retraced"
for name in "$@"; do
  if [[ $name =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
    san="$san,IP:$name"
  else
    san="$san,DNS:$name"
  fi
done

umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$out/ca.key" -out "$out/ca.pem" -days $((days * 10)) \
  -subj "/CN=retrace CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# leaf NAME CN EXTENSIONS: a key and a certificate signed by the CA.
leaf() {
  local name=$1 cn=$2 extensions=$3
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$out/$name.key" -out "$work/$name.csr" -subj "/CN=$cn" 2>/dev/null
  printf '%s\n' "$extensions" > "$work/$name.ext"
  openssl x509 -req -in "$work/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" \
    -extfile "$work/$name.ext" -out "$out/$name.pem" 2>/dev/null
}

leaf server retraced "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san"
leaf client retrace-client "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"

# Certificates are public; keys stay readable by their owner only.
chmod 644 "$out/ca.pem" "$out/server.pem" "$out/client.pem"
openssl verify -CAfile "$out/ca.pem" "$out/server.pem" "$out/client.pem" >/dev/null
echo "make-certs: wrote ca, server ($san) and client certificates to $out" >&2
