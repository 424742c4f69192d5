#!/usr/bin/python3
"""Overload and abuse of a running retraced over loopback.

    abuse_client.py --address 127.0.0.1:PORT --pid PID --shape 1,28,28 \
        --pb-dir BUILD/client/python --seconds 60 [--threads 8] \
        [--rss-interval 10] [--max-message-bytes N] [--report out.json]

First every valid request kind is answered once, alone: those answers are the
reference. Then --threads workers send, until --seconds have passed, a random
mix of
  valid:   tensor and PNG queries (4 seeds each), self-influence pages,
           store info; each answer must equal its reference exactly, or be
           RESOURCE_EXHAUSTED (a limit was reached) or DEADLINE_EXCEEDED
           (only for the requests sent with a short deadline);
  invalid: NaN and out-of-range tensors, a PNG claiming 30000x30000 pixels,
           a PNG with a broken CRC, bytes that are no image, a message over
           the server's size limit, a 100 kB page_token and request_id, a
           top_k of 100000; each must get INVALID_ARGUMENT (or
           RESOURCE_EXHAUSTED for the oversized message and when the server
           is at its limits), with a message under 1 kB;
  abuse:   streams whose client vanishes after writing (cancelled unread),
           slow readers of streams (every answer still exact), and bursts of
           three times --burst concurrent calls.
Any other code (UNKNOWN, INTERNAL, UNAVAILABLE...), any wrong answer, or the
server process exiting is a failure. The server's resident memory (VmRSS of
--pid) is sampled every --rss-interval seconds. Prints a summary and the RSS
table; exit status 0 only when nothing failed.
"""
import argparse
import collections
import json
import os
import random
import struct
import sys
import threading
import time
import zlib


def png_bytes(channels, height, width, pixel, bit_depth=8):
    """A PNG of `pixel(c, y, x)` bytes (colour type 0 gray or 2 RGB)."""
    raw = bytearray()
    for y in range(height):
        raw.append(0)
        for x in range(width):
            for c in range(channels):
                v = pixel(c, y, x)
                raw += bytes([v]) if bit_depth == 8 else bytes([v, v])
    colour = 0 if channels == 1 else 2

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(
            ">I", zlib.crc32(body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
            chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


class Abuse:
    def __init__(self, args):
        sys.path.insert(0, args.pb_dir)
        import grpc
        from retrace.v1 import attribution_pb2 as pb
        from retrace.v1 import attribution_pb2_grpc as pb_grpc
        self.grpc, self.pb = grpc, pb
        self.args = args
        self.channel = grpc.insecure_channel(
            args.address,
            options=[("grpc.max_send_message_length", 64 << 20),
                     ("grpc.max_receive_message_length", 64 << 20)])
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.stub = pb_grpc.AttributionStub(self.channel)
        # The port opens before the store is loaded (UNAVAILABLE until then).
        until = time.monotonic() + 300
        while True:
            try:
                self.stub.GetStoreInfo(pb.GetStoreInfoRequest(), timeout=10)
                break
            except grpc.RpcError:
                if time.monotonic() > until:
                    raise
                time.sleep(0.2)
        self.c, self.h, self.w = args.shape
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.failures = []
        self.reference = {}

    # --- requests ----------------------------------------------------------------

    def tensor_request(self, seed, value=None, at=0):
        pb = self.pb
        r = pb.AttributeRequest(top_k=5, opponents=True, seed=seed,
                                query_timesteps=1, query_noise_draws=1,
                                request_id=f"tensor-{seed}")
        r.tensor.shape.extend([self.c, self.h, self.w])
        values = [((i * 7 + seed * 13) % 255) / 127.5 - 1.0
                  for i in range(self.c * self.h * self.w)]
        if value is not None:
            values[at] = value
        r.tensor.values.extend(values)
        return r

    def image_request(self, seed, image=None):
        pb = self.pb
        if image is None:
            image = png_bytes(self.c, self.h, self.w,
                              lambda c, y, x: (x * 9 + y * 5 + c * 50 + seed) % 256)
        return pb.AttributeRequest(image=image, top_k=5, seed=seed,
                                   query_timesteps=1, query_noise_draws=1,
                                   request_id=f"image-{seed}")

    def valid(self):
        pb = self.pb
        kinds = []
        for seed in range(4):
            kinds.append((f"tensor-{seed}", "Attribute", self.tensor_request(seed)))
            kinds.append((f"image-{seed}", "Attribute", self.image_request(seed)))
        kinds.append(("self-influence", "SelfInfluence",
                      pb.SelfInfluenceRequest(method=pb.TRACIN, page_size=7)))
        kinds.append(("store-info", "GetStoreInfo", pb.GetStoreInfoRequest()))
        return kinds

    def invalid(self):
        nan, big = float("nan"), 1e30
        png = png_bytes(self.c, self.h, self.w, lambda c, y, x: 0)
        huge = bytearray(png)
        huge[16:24] = struct.pack(">II", 30000, 30000)
        huge[29:33] = struct.pack(">I", zlib.crc32(bytes(huge[12:29])) & 0xFFFFFFFF)
        broken = bytearray(png)
        broken[-13] ^= 0x40  # IDAT's CRC
        sixteen = png_bytes(self.c, self.h, self.w, lambda c, y, x: 1, bit_depth=16)
        oversized = self.image_request(0, image=b"\x89PNG" + b"x" * (
            self.args.max_message_bytes + 1024))
        token = self.pb.SelfInfluenceRequest(page_token="t" * 100000)
        long_id = self.tensor_request(0)
        long_id.request_id = "r" * 100000
        top_k = self.tensor_request(0)
        top_k.top_k = 100000
        ia, re_ = "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"
        return [
            ("nan-tensor", "Attribute", self.tensor_request(0, nan, 17), ia),
            ("range-tensor", "Attribute", self.tensor_request(0, 1.5, 3), ia),
            ("huge-tensor", "Attribute", self.tensor_request(0, -big, 0), ia),
            ("30000-png", "Attribute", self.image_request(0, bytes(huge)), ia),
            ("crc-png", "Attribute", self.image_request(0, bytes(broken)), ia),
            ("16-bit-png", "Attribute", self.image_request(0, sixteen), ia),
            ("not-an-image", "Attribute", self.image_request(0, b"GIF89a" * 40), ia),
            ("oversized", "Attribute", oversized, re_),
            ("long-page-token", "SelfInfluence", token, ia),
            ("long-request-id", "Attribute", long_id, ia),
            ("top-k", "Attribute", top_k, ia),
        ]

    # --- checks --------------------------------------------------------------------

    def fail(self, what):
        with self.lock:
            self.failures.append(what)
            print("FAIL:", what, file=sys.stderr, flush=True)

    def count(self, key):
        with self.lock:
            self.counts[key] += 1

    def call(self, method, request, timeout=30.0):
        return getattr(self.stub, method)(request, timeout=timeout)

    def check_valid(self, name, method, request, timeout=30.0):
        grpc = self.grpc
        try:
            got = self.call(method, request, timeout).SerializeToString()
        except grpc.RpcError as e:
            code = e.code().name
            if code == "RESOURCE_EXHAUSTED" or (
                    code == "DEADLINE_EXCEEDED" and timeout < 1):
                self.count(f"valid {code}")
                return
            self.fail(f"{name}: {code} {e.details()[:200]}")
            return
        if strip_timings(self.pb, method, got) != self.reference[name]:
            self.fail(f"{name}: the answer differs from the reference")
        else:
            self.count("valid OK")

    def check_invalid(self, name, method, request, want):
        grpc = self.grpc
        try:
            self.call(method, request)
        except grpc.RpcError as e:
            code = e.code().name
            if code == want or code == "RESOURCE_EXHAUSTED":
                if len(e.details() or "") >= 1024:
                    self.fail(f"{name}: a {len(e.details())}-byte message")
                self.count(f"invalid {code}")
                return
            self.fail(f"{name}: {code} (want {want}) {e.details()[:200]}")
            return
        self.fail(f"{name}: accepted")

    def vanishing_stream(self, kinds):
        grpc = self.grpc
        requests = [random.choice(kinds)[2] for _ in range(8)]
        requests = [r for r in requests if isinstance(r, self.pb.AttributeRequest)]
        call = self.stub.AttributeStream(iter(requests), timeout=30)
        time.sleep(random.random() * 0.05)
        call.cancel()
        try:
            for _ in call:
                pass
        except grpc.RpcError as e:
            if e.code().name not in ("CANCELLED", "RESOURCE_EXHAUSTED"):
                self.fail(f"vanishing stream: {e.code().name}")
                return
        self.count("stream cancelled")

    def slow_stream(self):
        grpc = self.grpc
        names = [f"tensor-{s}" for s in range(4)] + [f"image-{s}" for s in range(4)]
        chosen = [random.choice(names) for _ in range(6)]
        by_id = {}
        requests = []
        for i, n in enumerate(chosen):
            r = self.pb.AttributeRequest()
            r.CopyFrom(self.requests[n])
            r.request_id = f"{n}#{i}"
            by_id[r.request_id] = n
            requests.append(r)
        try:
            for out in self.stub.AttributeStream(iter(requests), timeout=60):
                time.sleep(0.2)  # a slow reader
                name = by_id[out.request_id]
                if out.error_code != 0:
                    if out.error_code != grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]:
                        self.fail(f"slow stream {name}: error {out.error_code}")
                    continue
                got = out.response
                got.request_id = name
                if strip_timings(self.pb, "Attribute",
                                 got.SerializeToString()) != self.reference[name]:
                    self.fail(f"slow stream {name}: the answer differs")
                else:
                    self.count("stream OK")
        except grpc.RpcError as e:
            if e.code().name != "RESOURCE_EXHAUSTED":
                self.fail(f"slow stream: {e.code().name} {e.details()[:200]}")

    def burst(self, kinds):
        threads = []
        for _ in range(3 * self.args.burst):
            name, method, request = random.choice(kinds)
            t = threading.Thread(target=self.check_valid, args=(name, method, request))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        self.count("bursts")

    # --- the run ---------------------------------------------------------------------

    def run(self):
        args = self.args
        kinds = self.valid()
        self.requests = {n: r for n, _, r in kinds}
        for name, method, request in kinds:
            self.reference[name] = strip_timings(
                self.pb, method, self.call(method, request).SerializeToString())
        bad = self.invalid()
        start = time.monotonic()
        end = start + args.seconds
        rss = [(0.0, rss_kib(args.pid))]
        stop = threading.Event()

        def sampler():
            next_at = start + args.rss_interval
            while not stop.is_set():
                if not alive(args.pid):
                    self.fail("the server process exited")
                    stop.set()
                    return
                if time.monotonic() >= next_at:
                    rss.append((time.monotonic() - start, rss_kib(args.pid)))
                    print(f"t={rss[-1][0]:.0f}s rss={rss[-1][1] / 1024:.1f} MiB "
                          f"{dict(self.counts)}", flush=True)
                    next_at += args.rss_interval
                time.sleep(0.2)

        def worker(index):
            rng = random.Random(index)
            random.seed(index)
            while time.monotonic() < end and not stop.is_set():
                roll = rng.random()
                if roll < 0.45:
                    name, method, request = rng.choice(kinds)
                    short = rng.random() < 0.05
                    self.check_valid(name, method, request, 0.001 if short else 30.0)
                elif roll < 0.85:
                    self.check_invalid(*rng.choice(bad))
                elif roll < 0.92:
                    self.vanishing_stream(kinds)
                elif roll < 0.98:
                    self.slow_stream()
                else:
                    self.burst(kinds)

        watcher = threading.Thread(target=sampler)
        watcher.start()
        workers = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        stop.set()
        watcher.join()
        if alive(args.pid):
            rss.append((time.monotonic() - start, rss_kib(args.pid)))
            try:  # still answering after everything
                self.check_valid(*kinds[0])
            except Exception as e:  # noqa: BLE001
                self.fail(f"after the run: {e}")
        else:
            self.fail("the server process exited")
        return rss


def strip_timings(pb, method, data):
    """The answer without what legitimately varies: timings (and none else)."""
    if method != "Attribute":
        return data
    r = pb.AttributeResponse.FromString(data)
    del r.timings[:]
    return r.SerializeToString()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--shape", required=True,
                   type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--pb-dir", required=True)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--burst", type=int, default=4,
                   help="the server's --max-concurrent (bursts send 3x)")
    p.add_argument("--rss-interval", type=float, default=10)
    p.add_argument("--max-message-bytes", type=int, default=1 << 20)
    p.add_argument("--report")
    args = p.parse_args()
    abuse = Abuse(args)
    rss = abuse.run()
    summary = {
        "seconds": args.seconds,
        "threads": args.threads,
        "counts": dict(abuse.counts),
        "failures": abuse.failures[:50],
        "rss_kib": [{"t_s": round(t, 1), "rss_kib": v} for t, v in rss],
    }
    print(json.dumps(summary, indent=1))
    print("| elapsed | RSS (MiB) |\n| --- | --- |")
    for t, v in rss:
        print(f"| {t / 60:.1f} min | {v / 1024:.1f} |")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(summary, f, indent=1)
    if abuse.failures:
        print(f"{len(abuse.failures)} failures", file=sys.stderr)
        return 1
    if abuse.counts["valid OK"] == 0:
        print("no valid request was answered", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
