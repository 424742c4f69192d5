"""Smoke test of client/python/retrace_client.py against an in-process fake.

The fake implements retrace.v1.Attribution with the generated servicer base
class and grpc.health.v1.Health/Check with a generic handler; it records
every request and its metadata, so the tests check what the client puts on
the wire (fields, defaults left to the server, the bearer token, paging
tokens), not the client's own idea of it. TLS and mutual TLS run with
certificates from deploy/make-certs.sh, the script docs/operations.md tells
operators to use.

Environment: RETRACE_PY_STUBS (the generated stubs) and RETRACE_SOURCE_DIR
(the repository). Exit status 77 (skipped), with the reason, when grpcio is
missing; missing stubs are a failure.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest
from concurrent import futures

SKIP = 77

source_dir = os.environ.get("RETRACE_SOURCE_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(source_dir, "client", "python"))

try:
    import grpc
except ImportError as e:
    print("SKIPPED: grpcio is not importable by %s (%s); Debian: python3-grpcio"
          % (sys.executable, e))
    sys.exit(SKIP)
try:
    import retrace_client
    from retrace_client import RetraceClient, attribution_pb2 as pb
    from retrace_client import attribution_pb2_grpc as pb_grpc
except ImportError as e:
    # The stubs are built with the tree (target retrace_python_stubs): their
    # absence here is a failure, not a reason to skip.
    print("FAIL: %s" % e)
    sys.exit(1)

try:
    import numpy as np
except ImportError:
    np = None

TOKEN = "t0ken-for-tests"
NUM_SAMPLES = 250


def sample(rank, index, score):
    return pb.AttributedSample(rank=rank, index=index, sample_id=1000 + index,
                               label=index % 10, score=score)


class FakeAttribution(pb_grpc.AttributionServicer):
    """Answers from fixed data and records (method, request, metadata)."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def record(self, method, request, context):
        metadata = dict(context.invocation_metadata())
        with self.lock:
            self.calls.append((method, request, metadata))

    def Attribute(self, request, context):
        self.record("Attribute", request, context)
        if request.top_k > 4096:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "top_k must be in 1..4096, got %d" % request.top_k)
        k = request.top_k or 10
        methods = list(request.methods) or [pb.TRACIN, pb.RETRAC]
        response = pb.AttributeResponse(store_id="ab" * 32,
                                        request_id=request.request_id)
        for m in methods:
            result = response.results.add(method=m)
            result.proponents.extend(sample(r + 1, r, 1.0 - r) for r in range(k))
        response.timings.add(stage="score", milliseconds=1.5)
        return response

    def AttributeStream(self, request_iterator, context):
        for request in request_iterator:
            self.record("AttributeStream", request, context)
            if request.top_k < 0:
                yield pb.AttributeStreamResponse(
                    error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                    error_message="top_k must be in 1..4096",
                    request_id=request.request_id)
            else:
                yield pb.AttributeStreamResponse(
                    response=pb.AttributeResponse(request_id=request.request_id),
                    request_id=request.request_id)

    def SelfInfluence(self, request, context):
        self.record("SelfInfluence", request, context)
        size = request.page_size or 100
        offset = int(request.page_token.split(":")[1]) if request.page_token else 0
        end = min(NUM_SAMPLES, offset + size)
        response = pb.SelfInfluenceResponse(
            samples=[sample(r + 1, NUM_SAMPLES - 1 - r, float(NUM_SAMPLES - r))
                     for r in range(offset, end)])
        if end < NUM_SAMPLES:
            response.next_page_token = "page:%d" % end
        return response

    def GetStoreInfo(self, request, context):
        self.record("GetStoreInfo", request, context)
        return pb.StoreInfo(store_id="ab" * 32, num_samples=NUM_SAMPLES,
                            num_checkpoints=3, num_buckets=10, dim=64)


class FakeServer:
    """The fake on 127.0.0.1, plaintext or TLS, with a settable health."""

    def __init__(self, server_credentials=None):
        self.servicer = FakeAttribution()
        self.health_status = 1  # SERVING
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_AttributionServicer_to_server(self.servicer, self.server)
        self.server.add_generic_rpc_handlers((self._health_handler(),))
        if server_credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0",
                                                    server_credentials)
        self.server.start()

    def _health_handler(self):
        request_class = retrace_client._HealthCheckRequest
        response_class = retrace_client._HealthCheckResponse

        def check(request, context):
            self.servicer.record("Health/Check", request, context)
            return response_class(status=self.health_status)

        return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
            "Check": grpc.unary_unary_rpc_method_handler(
                check, request_deserializer=request_class.FromString,
                response_serializer=response_class.SerializeToString)})

    def stop(self):
        self.server.stop(None)


class ClientAgainstFake(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.fake = FakeServer()
        cls.client = RetraceClient("127.0.0.1:%d" % cls.fake.port, token=TOKEN,
                                   timeout=30)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.fake.stop()

    def last(self, method):
        calls = [c for c in self.fake.servicer.calls if c[0] == method]
        self.assertTrue(calls, "the server saw no %s call" % method)
        return calls[-1]

    def test_attribute_sends_every_field(self):
        png = b"\x89PNG\r\n\x1a\n fake image bytes"
        response = self.client.attribute(
            png, top_k=5, opponents=True, methods=["retrac"], pairing="replay",
            checkpoints=[0, 2], buckets=[1, 3], query_timesteps=3,
            query_noise_draws=2, seed=7, include_breakdown=True,
            include_thumbnails=True, request_id="req-1")
        _, request, metadata = self.last("Attribute")
        expected = pb.AttributeRequest(
            image=png, top_k=5, opponents=True, methods=[pb.RETRAC],
            pairing=pb.REPLAY, checkpoints=[0, 2], buckets=[1, 3],
            query_timesteps=3, query_noise_draws=2, seed=7,
            include_breakdown=True, include_thumbnails=True,
            request_id="req-1")
        self.assertEqual(request, expected)
        self.assertEqual(metadata.get("authorization"), "Bearer " + TOKEN)
        self.assertEqual(response.request_id, "req-1")
        self.assertEqual([r.method for r in response.results], [pb.RETRAC])
        self.assertEqual([s.rank for s in response.results[0].proponents],
                         [1, 2, 3, 4, 5])

    def test_defaults_are_left_to_the_server(self):
        self.client.attribute(b"img")
        _, request, _ = self.last("Attribute")
        # 0 / empty on the wire: the server applies top_k 10, both methods,
        # MATCHED, 2 timesteps and 4 noise draws.
        self.assertEqual(request, pb.AttributeRequest(image=b"img"))
        self.assertFalse(request.HasField("tensor"))

    def test_image_from_a_file(self):
        with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as f:
            f.write(b"file image bytes")
        try:
            self.client.attribute(f.name, top_k=1)
        finally:
            os.unlink(f.name)
        _, request, _ = self.last("Attribute")
        self.assertEqual(request.image, b"file image bytes")
        self.assertEqual(request.WhichOneof("input"), "image")

    def test_tensor_from_shape_and_values(self):
        self.client.attribute(tensor=((2, 2), [0.5, -0.5, 1.0, -1.0]))
        _, request, _ = self.last("Attribute")
        self.assertEqual(request.WhichOneof("input"), "tensor")
        self.assertEqual(list(request.tensor.shape), [2, 2])
        self.assertEqual(list(request.tensor.values), [0.5, -0.5, 1.0, -1.0])

    @unittest.skipIf(np is None, "numpy is not installed")
    def test_tensor_from_numpy(self):
        x = np.linspace(-1, 1, 2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
        self.client.attribute(tensor=x)
        _, request, _ = self.last("Attribute")
        self.assertEqual(list(request.tensor.shape), [2, 3, 4])
        np.testing.assert_array_equal(
            np.array(request.tensor.values, dtype=np.float32),
            x.astype(np.float32).ravel())

    @unittest.skipIf(np is None, "numpy is not installed")
    def test_query_vectors_from_arrays(self):
        rng = np.random.default_rng(3)
        raw = rng.standard_normal((3, 10, 8)).astype(np.float32)
        unit = rng.standard_normal((3, 10, 8)).astype(np.float32)
        self.client.attribute(query_vectors=(raw, unit), store_id="cd" * 32)
        _, request, _ = self.last("Attribute")
        v = request.query_vectors
        self.assertEqual((v.num_checkpoints, v.num_slots, v.dim), (3, 10, 8))
        self.assertEqual(v.store_id, "cd" * 32)
        # Row-major [C, S, D]: element (c, s, d) at (c * S + s) * D + d.
        np.testing.assert_array_equal(np.array(v.raw, np.float32), raw.ravel())
        np.testing.assert_array_equal(np.array(v.unit, np.float32), unit.ravel())
        self.assertEqual(v.raw[(2 * 10 + 7) * 8 + 5], raw[2, 7, 5])

    def test_query_vectors_message_gets_the_store_id(self):
        message = pb.QueryVectors(num_checkpoints=1, num_slots=1, dim=2,
                                  raw=[1, 2], unit=[0.6, 0.8])
        self.client.attribute(query_vectors=message, store_id="ef" * 32)
        _, request, _ = self.last("Attribute")
        self.assertEqual(request.query_vectors.store_id, "ef" * 32)
        self.assertEqual(message.store_id, "")  # the caller's copy untouched

    def test_input_errors_are_caught_before_sending(self):
        before = len(self.fake.servicer.calls)
        with self.assertRaises(ValueError):
            self.client.attribute()
        with self.assertRaises(ValueError):
            self.client.attribute(b"img", tensor=((1,), [0.0]))
        with self.assertRaises(ValueError):
            self.client.attribute(b"img", methods=["tracin", "dtrak"])
        with self.assertRaises(ValueError):
            self.client.attribute(b"img", pairing="sideways")
        with self.assertRaises(TypeError):
            self.client.attribute(12345)
        self.assertEqual(len(self.fake.servicer.calls), before)

    def test_server_errors_surface_as_rpc_errors(self):
        with self.assertRaises(grpc.RpcError) as raised:
            self.client.attribute(b"img", top_k=5000)
        self.assertEqual(raised.exception.code(),
                         grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("top_k", raised.exception.details())

    def test_stream_answers_in_order_and_carries_errors(self):
        requests = [
            retrace_client.build_attribute_request(b"a", request_id="r0"),
            {"image": b"b", "top_k": -1, "request_id": "r1"},
            {"image": b"c", "request_id": "r2"},
        ]
        responses = list(self.client.attribute_stream(requests))
        self.assertEqual([r.request_id for r in responses], ["r0", "r1", "r2"])
        self.assertEqual(responses[0].error_code, 0)
        self.assertTrue(responses[0].HasField("response"))
        self.assertEqual(responses[1].error_code,
                         grpc.StatusCode.INVALID_ARGUMENT.value[0])
        self.assertFalse(responses[1].HasField("response"))
        self.assertEqual(responses[2].error_code, 0)

    def test_self_influence_pages_with_the_servers_tokens(self):
        first = len(self.fake.servicer.calls)
        samples = self.client.self_influence(top=230, method="tracin",
                                             page_size=100)
        calls = [c for c in self.fake.servicer.calls[first:]
                 if c[0] == "SelfInfluence"]
        self.assertEqual([c[1].page_token for c in calls],
                         ["", "page:100", "page:200"])
        self.assertTrue(all(c[1].method == pb.TRACIN for c in calls))
        self.assertTrue(all(c[1].page_size == 100 for c in calls))
        self.assertEqual(len(samples), 230)
        self.assertEqual([s.rank for s in samples], list(range(1, 231)))

    def test_self_influence_all_stops_at_the_last_page(self):
        samples = self.client.self_influence(top=None, page_size=100)
        self.assertEqual(len(samples), NUM_SAMPLES)
        _, request, _ = self.last("SelfInfluence")
        self.assertEqual(request.method, pb.RETRAC)  # the client's default

    def test_self_influence_default_page_size_follows_top(self):
        samples = self.client.self_influence(top=20)
        self.assertEqual(len(samples), 20)
        _, request, _ = self.last("SelfInfluence")
        self.assertEqual(request.page_size, 20)

    def test_store_info(self):
        info = self.client.store_info()
        self.assertEqual(info.num_samples, NUM_SAMPLES)
        self.assertEqual(info.store_id, "ab" * 32)
        _, _, metadata = self.last("GetStoreInfo")
        self.assertEqual(metadata.get("authorization"), "Bearer " + TOKEN)

    def test_health(self):
        self.assertEqual(self.client.health(), "SERVING")
        self.fake.health_status = 2
        try:
            self.assertEqual(self.client.health("retrace.v1.Attribution"),
                             "NOT_SERVING")
        finally:
            self.fake.health_status = 1
        _, request, _ = self.last("Health/Check")
        self.assertEqual(request.service, "retrace.v1.Attribution")

    def test_no_token_sends_no_authorization(self):
        with RetraceClient("127.0.0.1:%d" % self.fake.port) as client:
            client.store_info(timeout=30)
        _, _, metadata = self.last("GetStoreInfo")
        self.assertNotIn("authorization", metadata)

    def test_example_prints_a_table(self):
        work = tempfile.mkdtemp()
        try:
            image = os.path.join(work, "query.png")
            with open(image, "wb") as f:
                f.write(b"example image bytes")
            tokens = os.path.join(work, "tokens.txt")
            with open(tokens, "w") as f:
                f.write("# the pipeline's token\n%s\n" % TOKEN)
            env = dict(os.environ)
            run = subprocess.run(
                [sys.executable,
                 os.path.join(source_dir, "client", "python", "example.py"),
                 "--server", "127.0.0.1:%d" % self.fake.port,
                 "--token-file", tokens, "--top-k", "3", "--method", "retrac",
                 image],
                env=env, capture_output=True, text=True, timeout=120)
        finally:
            shutil.rmtree(work)
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertIn("RETRAC", run.stdout)
        self.assertIn("proponents", run.stdout)
        rows = [line.split() for line in run.stdout.splitlines()
                if line.strip()[:1].isdigit()]
        self.assertEqual([r[0] for r in rows], ["1", "2", "3"])
        _, request, metadata = self.last("Attribute")
        self.assertEqual(request.image, b"example image bytes")
        self.assertEqual(request.top_k, 3)
        self.assertEqual(list(request.methods), [pb.RETRAC])
        self.assertEqual(request.request_id, "query.png")
        self.assertEqual(metadata.get("authorization"), "Bearer " + TOKEN)


class TokenFile(unittest.TestCase):

    def test_first_token_skipping_comments_and_blanks(self):
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write("# tokens for the pipeline\n\n   \n  abc123  \nsecond\n")
        try:
            self.assertEqual(retrace_client.read_token_file(f.name), "abc123")
        finally:
            os.unlink(f.name)

    def test_no_token(self):
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write("# nothing\n\n")
        try:
            with self.assertRaises(ValueError):
                retrace_client.read_token_file(f.name)
        finally:
            os.unlink(f.name)


@unittest.skipIf(shutil.which("openssl") is None, "openssl is not installed")
class Tls(unittest.TestCase):
    """TLS and mutual TLS with deploy/make-certs.sh's certificates."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp()
        subprocess.run(["bash", os.path.join(source_dir, "deploy",
                                             "make-certs.sh"), cls.dir],
                       check=True)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir)

    def path(self, name):
        return os.path.join(self.dir, name)

    def read(self, name):
        with open(self.path(name), "rb") as f:
            return f.read()

    def test_tls(self):
        fake = FakeServer(grpc.ssl_server_credentials(
            [(self.read("server.key"), self.read("server.pem"))]))
        try:
            # Paths or bytes; the certificate names localhost and 127.0.0.1.
            with RetraceClient("localhost:%d" % fake.port,
                               root_certificates=self.path("ca.pem"),
                               timeout=30) as client:
                self.assertEqual(client.health(), "SERVING")
            with RetraceClient("127.0.0.1:%d" % fake.port,
                               root_certificates=self.read("ca.pem"),
                               server_name="retraced", timeout=30) as client:
                self.assertEqual(client.store_info().num_samples, NUM_SAMPLES)
            # Without the CA the server's certificate is not trusted.
            with RetraceClient("localhost:%d" % fake.port, tls=True,
                               timeout=10) as client:
                with self.assertRaises(grpc.RpcError) as raised:
                    client.health()
                self.assertEqual(raised.exception.code(),
                                 grpc.StatusCode.UNAVAILABLE)
        finally:
            fake.stop()

    def test_mutual_tls(self):
        fake = FakeServer(grpc.ssl_server_credentials(
            [(self.read("server.key"), self.read("server.pem"))],
            root_certificates=self.read("ca.pem"),
            require_client_auth=True))
        try:
            with RetraceClient("localhost:%d" % fake.port,
                               root_certificates=self.path("ca.pem"),
                               private_key=self.path("client.key"),
                               certificate_chain=self.path("client.pem"),
                               timeout=30) as client:
                self.assertEqual(client.health(), "SERVING")
            with RetraceClient("localhost:%d" % fake.port,
                               root_certificates=self.path("ca.pem"),
                               timeout=10) as client:
                with self.assertRaises(grpc.RpcError) as raised:
                    client.health()
                self.assertEqual(raised.exception.code(),
                                 grpc.StatusCode.UNAVAILABLE)
        finally:
            fake.stop()

    def test_client_certificate_needs_key_and_chain(self):
        with self.assertRaises(ValueError):
            RetraceClient("localhost:1", private_key=self.path("client.key"))


if __name__ == "__main__":
    unittest.main(verbosity=2)
