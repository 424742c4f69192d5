#!/usr/bin/env python3
"""Asks retraced which training images most influenced an image file and
prints the answer as a table, one per method.

    RETRACE_PY_STUBS=build/client/python /usr/bin/python3 client/python/example.py \
        --server localhost:50051 query.png --top-k 10 --opponents

With TLS: --ca ca.pem (and --cert client.pem --key client.key for mutual
TLS); with tokens: --token-file tokens.txt (its first token is used).
--thumbnails DIR also writes each returned training image to DIR as PNG.
"""

import argparse
import os
import sys

import grpc

from retrace_client import RetraceClient, attribution_pb2, read_token_file


def method_name(number):
    return attribution_pb2.Method.Name(number)


def print_table(title, samples):
    print("  %s" % title)
    print("  %4s  %8s  %14s  %-16s  %12s" % ("rank", "index", "sample_id",
                                            "label", "score"))
    for s in samples:
        label = "%d %s" % (s.label, s.label_name) if s.label_name else str(s.label)
        print("  %4d  %8d  %14d  %-16s  %12.5g" % (s.rank, s.index, s.sample_id,
                                                  label[:16], s.score))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="PNG or JPEG file to attribute")
    parser.add_argument("--server", default="localhost:50051",
                        help="retraced address (default: %(default)s)")
    parser.add_argument("--token-file", help="bearer token file")
    parser.add_argument("--ca", help="PEM CA certificate: use TLS")
    parser.add_argument("--cert", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--key", help="PEM client key (mutual TLS)")
    parser.add_argument("--server-name",
                        help="name in the server's certificate, when it "
                             "differs from the host in --server")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--opponents", action="store_true")
    parser.add_argument("--method", action="append", choices=["tracin", "retrac"],
                        help="repeat for both (default: both)")
    parser.add_argument("--pairing", choices=["matched", "replay"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thumbnails", metavar="DIR",
                        help="write the returned training images to DIR")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="deadline per call in seconds")
    args = parser.parse_args()

    token = read_token_file(args.token_file) if args.token_file else None
    with RetraceClient(args.server, token=token, root_certificates=args.ca,
                       private_key=args.key, certificate_chain=args.cert,
                       server_name=args.server_name,
                       timeout=args.timeout) as client:
        try:
            info = client.store_info()
            print("store %s…: %d samples, %d checkpoints, %d buckets%s, D=%d, "
                  "%s backend" % (info.store_id[:12], info.num_samples,
                                  info.num_checkpoints, info.num_buckets,
                                  " + replay" if info.has_replay else "",
                                  info.dim, info.backend))
            response = client.attribute(
                args.image, top_k=args.top_k, opponents=args.opponents,
                methods=args.method, pairing=args.pairing, seed=args.seed,
                include_thumbnails=bool(args.thumbnails),
                request_id=os.path.basename(args.image))
        except grpc.RpcError as e:
            print("retrace: %s: %s" % (e.code().name, e.details()),
                  file=sys.stderr)
            return 1

    for result in response.results:
        print("\n%s" % method_name(result.method))
        print_table("proponents (highest first)", result.proponents)
        if args.opponents:
            print_table("opponents (lowest first)", result.opponents)
        if args.thumbnails:
            os.makedirs(args.thumbnails, exist_ok=True)
            for kind, samples in (("pro", result.proponents),
                                  ("opp", result.opponents)):
                for s in samples:
                    name = "%s-%s-%02d-%d.png" % (method_name(result.method).lower(),
                                                  kind, s.rank, s.index)
                    with open(os.path.join(args.thumbnails, name), "wb") as f:
                        f.write(s.thumbnail_png)
    print("\ntimings: " + ", ".join("%s %.2f ms" % (t.stage, t.milliseconds)
                                    for t in response.timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
