"""docker-compose.yml is accepted by Debian's docker-compose (1.29) and says
what docs/operations.md promises.

Runs `docker-compose -f docker-compose.yml config`, which validates the file
against the Compose schema and prints it resolved, without a Docker engine.
Checks the exit status, that nothing was warned about (e.g. an unset
variable), and in the resolved output: the services retraced and prometheus,
retraced's NVIDIA GPU reservation, its store volume mounted read-only where
the image's config file (deploy/retraced.toml) expects it, its ports (the
config file's gRPC and metrics ports), and the Prometheus configuration
mounted into prometheus, where that configuration scrapes retraced's metrics
port by its service name. A second run with the RETRACE_* variables set
checks that they choose the host paths.

The GPU override (docker-compose.gpu.yml, docs/operations.md "The GPU
image") is resolved the same way, together with docker-compose.yml: it must
change only how retraced's image is built (Dockerfile.gpu) and tagged (a tag
naming Dockerfile.gpu's LibTorch and CUDA pins, never `latest`), keep exactly
one NVIDIA GPU reservation, and leave everything else as the base file has
it; without the override the CPU-LibTorch Dockerfile stays the default.

The multi-GPU host's file (docker-compose.shards.yml, docs/operations.md
"Scale-out: router and shards") is resolved on its own: a router and two
shards, shard i serving --shard-part i/2 on GPU i alone, the router listing
exactly the shard services, the scale-out configuration file mounted over the
image's, Prometheus (deploy/prometheus-shards.yml) scraping all three, and
Grafana provisioned with the Prometheus datasource and the dashboards
directory. A broken copy (two shards on one GPU) must be caught.

Exit status 77 (skipped) when docker-compose is not installed.
Environment: RETRACE_SOURCE_DIR (the repository).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import unittest

SKIP = 77
SOURCE_DIR = os.environ.get("RETRACE_SOURCE_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
COMPOSE_FILE = os.path.join(SOURCE_DIR, "docker-compose.yml")
GPU_OVERRIDE = os.path.join(SOURCE_DIR, "docker-compose.gpu.yml")
SHARDS_FILE = os.path.join(SOURCE_DIR, "docker-compose.shards.yml")

DOCKER_COMPOSE = shutil.which("docker-compose")
if DOCKER_COMPOSE is None:
    print("SKIPPED: docker-compose is not installed (Debian: docker-compose; "
          "scripts/setup.sh lists it)")
    sys.exit(SKIP)
try:
    import yaml  # python3-yaml, a dependency of Debian's docker-compose
except ImportError as e:
    print("SKIPPED: PyYAML is not importable by %s (%s)" % (sys.executable, e))
    sys.exit(SKIP)

VARIABLES = ("RETRACE_STORE_DIR", "RETRACE_RUN_DIR", "RETRACE_MNIST_DIR")


def compose_config(extra_env=None, files=(COMPOSE_FILE,)):
    env = {k: v for k, v in os.environ.items()
           if k not in VARIABLES and not k.startswith("COMPOSE_")}
    env.update(extra_env or {})
    file_args = []
    for f in files:
        file_args += ["-f", f]
    # An empty --env-file, so that an operator's .env next to the compose
    # file does not change what is checked.
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty_env:
        return subprocess.run(
            [DOCKER_COMPOSE, "--env-file", empty_env.name] + file_args +
            ["config"],
            capture_output=True, text=True, env=env,
            cwd=os.path.dirname(COMPOSE_FILE), timeout=120)


def mounts(service):
    """(source, target, read_only) of a service's volumes, short or long form."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append((v.get("source"), v["target"], bool(v.get("read_only"))))
        else:
            parts = v.split(":")
            out.append((parts[0], parts[1],
                        len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def port_targets(service):
    targets = set()
    for p in service.get("ports", []):
        if isinstance(p, dict):
            targets.add(int(p["target"]))
        else:
            targets.add(int(str(p).split(":")[-1].split("/")[0]))
    return targets


class ComposeConfig(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.result = compose_config()
        cls.config = yaml.safe_load(cls.result.stdout) if cls.result.returncode == 0 \
            else None
        with open(os.path.join(SOURCE_DIR, "deploy", "retraced.toml"),
                  "rb") as f:
            cls.retraced_toml = tomllib.load(f)

    def setUp(self):
        self.assertEqual(self.result.returncode, 0,
                         "docker-compose config failed:\n" + self.result.stderr)

    def test_no_warnings(self):
        self.assertNotIn("WARNING", self.result.stderr, self.result.stderr)

    def test_both_services(self):
        self.assertEqual(set(self.config["services"]), {"retraced", "prometheus"})

    def test_gpu_reservation(self):
        devices = (self.config["services"]["retraced"]["deploy"]["resources"]
                   ["reservations"]["devices"])
        self.assertEqual(len(devices), 1)
        self.assertEqual(devices[0]["driver"], "nvidia")
        self.assertEqual(devices[0]["count"], 1)
        self.assertIn("gpu", devices[0]["capabilities"])

    def test_store_volume_read_only(self):
        by_target = {t: (s, ro) for s, t, ro in
                     mounts(self.config["services"]["retraced"])}
        store = self.retraced_toml["store"]
        self.assertIn(store, by_target)
        source, read_only = by_target[store]
        self.assertTrue(read_only, "the store must be mounted read-only")
        self.assertEqual(source, os.path.join(SOURCE_DIR, "build", "demo", "store"))
        for target, _ in by_target.items():
            self.assertTrue(by_target[target][1], "%s is not read-only" % target)

    def test_run_directory_is_passed_to_retraced(self):
        service = self.config["services"]["retraced"]
        command = service["command"]
        run_dir = command[command.index("--run") + 1]
        self.assertIn(run_dir, [t for _, t, _ in mounts(service)])

    def test_retraced_ports(self):
        listen_port = int(self.retraced_toml["listen"].rsplit(":", 1)[1])
        metrics_port = int(self.retraced_toml["metrics-port"])
        self.assertEqual(port_targets(self.config["services"]["retraced"]),
                         {listen_port, metrics_port})

    def test_stop_grace_period_exceeds_the_drain_timeout(self):
        grace = self.config["services"]["retraced"]["stop_grace_period"]
        self.assertTrue(grace.endswith("s") and grace[:-1].isdigit(), grace)
        self.assertGreater(int(grace[:-1]),
                           float(self.retraced_toml["drain-timeout-s"]))

    def test_prometheus_config_mount_scrapes_retraced(self):
        service = self.config["services"]["prometheus"]
        self.assertTrue(service["image"].startswith("prom/prometheus:"))
        by_target = {t: (s, ro) for s, t, ro in mounts(service)}
        target = "/etc/prometheus/prometheus.yml"
        self.assertIn(target, by_target)
        source, read_only = by_target[target]
        self.assertEqual(source,
                         os.path.join(SOURCE_DIR, "deploy", "prometheus.yml"))
        self.assertTrue(read_only)
        with open(source, encoding="utf-8") as f:
            prometheus = yaml.safe_load(f)
        targets = [t for job in prometheus["scrape_configs"]
                   for sc in job.get("static_configs", [])
                   for t in sc["targets"]]
        self.assertIn("retraced:%d" % int(self.retraced_toml["metrics-port"]),
                      targets)

    def test_variables_choose_the_host_paths(self):
        run = compose_config({"RETRACE_STORE_DIR": "/srv/retrace/store",
                              "RETRACE_RUN_DIR": "/srv/retrace/run",
                              "RETRACE_MNIST_DIR": "/srv/retrace/mnist"})
        self.assertEqual(run.returncode, 0, run.stderr)
        sources = {t: s for s, t, _ in
                   mounts(yaml.safe_load(run.stdout)["services"]["retraced"])}
        self.assertEqual(sources["/var/lib/retrace/store"], "/srv/retrace/store")
        self.assertEqual(sources["/var/lib/retrace/run"], "/srv/retrace/run")
        self.assertEqual(sources["/var/lib/retrace/data/mnist"],
                         "/srv/retrace/mnist")


def dockerfile_gpu_args():
    """Dockerfile.gpu's ARG defaults (NAME=value lines)."""
    with open(os.path.join(SOURCE_DIR, "Dockerfile.gpu"), encoding="utf-8") as f:
        return dict(re.findall(r'^ARG (\w+)="?([^"\n]*)"?$', f.read(), re.M))


class ComposeGpuOverride(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.base_result = compose_config()
        cls.result = compose_config(files=(COMPOSE_FILE, GPU_OVERRIDE))
        cls.base = yaml.safe_load(cls.base_result.stdout) \
            if cls.base_result.returncode == 0 else None
        cls.config = yaml.safe_load(cls.result.stdout) \
            if cls.result.returncode == 0 else None

    def setUp(self):
        self.assertEqual(self.result.returncode, 0,
                         "docker-compose config with the GPU override failed:\n"
                         + self.result.stderr)
        self.assertEqual(self.base_result.returncode, 0, self.base_result.stderr)

    def test_no_warnings(self):
        self.assertNotIn("WARNING", self.result.stderr, self.result.stderr)

    def test_builds_the_gpu_dockerfile(self):
        build = self.config["services"]["retraced"]["build"]
        self.assertEqual(build["dockerfile"], "Dockerfile.gpu")
        self.assertEqual(build["context"], SOURCE_DIR)
        self.assertTrue(os.path.exists(os.path.join(SOURCE_DIR, "Dockerfile.gpu")))

    def test_cpu_dockerfile_stays_the_default(self):
        build = self.base["services"]["retraced"]["build"]
        self.assertIn(build.get("dockerfile", "Dockerfile"), ("Dockerfile", None))

    def test_image_tag_names_the_pins(self):
        image = self.config["services"]["retraced"]["image"]
        self.assertNotIn("latest", image)
        args = dockerfile_gpu_args()
        self.assertEqual(image, "retrace:gpu-torch%s-%s"
                         % (args["TORCH_VERSION"], args["TORCH_CUDA"]))
        self.assertNotEqual(image, self.base["services"]["retraced"]["image"],
                            "the GPU image must not overwrite the CPU image's tag")

    def test_one_nvidia_gpu_reservation(self):
        devices = (self.config["services"]["retraced"]["deploy"]["resources"]
                   ["reservations"]["devices"])
        self.assertEqual(len(devices), 1, devices)
        self.assertEqual(devices[0]["driver"], "nvidia")
        self.assertEqual(devices[0]["count"], 1)
        self.assertIn("gpu", devices[0]["capabilities"])

    def test_only_the_image_changes(self):
        gpu = dict(self.config["services"]["retraced"])
        cpu = dict(self.base["services"]["retraced"])
        for key in ("build", "image"):
            gpu.pop(key)
            cpu.pop(key)
        # Merging files may reorder lists and rewrite a short-form volume;
        # compare what they mean.
        for service in (gpu, cpu):
            service["ports"] = sorted(map(repr, service["ports"]))
            service["volumes"] = sorted(mounts(service))
        self.assertEqual(gpu, cpu)
        self.assertEqual(self.config["services"]["prometheus"],
                         self.base["services"]["prometheus"])
        self.assertEqual(self.config.get("volumes"), self.base.get("volumes"))


def shard_problems(config, retraced_toml):
    """What is wrong with docker-compose.shards.yml's resolved services."""
    p = []
    services = config["services"]
    shards = sorted(n for n in services if n.startswith("shard-"))
    if set(services) != set(shards) | {"router", "prometheus", "grafana"} or \
            len(shards) < 2:
        return ["services are %s; expected router, shard-0..n, prometheus, "
                "grafana" % sorted(services)]
    listen_port = int(retraced_toml["listen"].rsplit(":", 1)[1])
    n = len(shards)
    gpus = []
    for i in range(n):
        name = "shard-%d" % i
        if name not in services:
            p.append("shards are not numbered 0..%d: %s missing" % (n - 1, name))
            continue
        svc = services[name]
        command = svc["command"]
        if command[command.index("--role") + 1] != "shard" or \
                command[command.index("--shard-part") + 1] != "%d/%d" % (i, n):
            p.append("%s must run --role shard --shard-part %d/%d: %s"
                     % (name, i, n, command))
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        if len(devices) != 1 or "count" in devices[0] or \
                len(devices[0].get("device_ids", [])) != 1:
            p.append("%s must reserve exactly one GPU by device_ids: %s"
                     % (name, devices))
        else:
            gpus.append(devices[0]["device_ids"][0])
        by_target = {t: (s, ro) for s, t, ro in mounts(svc)}
        if by_target.get(retraced_toml["store"], (None, False))[1] is not True:
            p.append("%s must mount the store read-only at %s"
                     % (name, retraced_toml["store"]))
    if len(set(gpus)) != len(gpus):
        p.append("shards share a GPU: device_ids %s" % gpus)
    router = services["router"]
    command = router["command"]
    listed = command[command.index("--shards") + 1].split(",")
    expected = ["%s:%d" % (s, listen_port) for s in shards]
    if sorted(listed) != expected:
        p.append("router --shards %s must list exactly %s" % (listed, expected))
    if "deploy" in router:
        p.append("the router reserves devices; the GPUs are the shards'")
    for name in shards + ["router"]:
        svc = services[name]
        by_target = {t: (s, ro) for s, t, ro in mounts(svc)}
        if by_target.get("/etc/retrace/retraced.toml") != (
                os.path.join(SOURCE_DIR, "deploy", "k8s", "base", "retraced.toml"),
                True):
            p.append("%s must mount deploy/k8s/base/retraced.toml read-only over "
                     "the image's /etc/retrace/retraced.toml" % name)
        grace = svc.get("stop_grace_period", "10s")
        if not (grace.endswith("s") and grace[:-1].isdigit()
                and int(grace[:-1]) > float(retraced_toml["drain-timeout-s"])):
            p.append("%s: stop_grace_period %s is not longer than the drain"
                     % (name, grace))
        if svc.get("image") != "retrace:latest" or "build" not in svc:
            p.append("%s must build retrace:latest, never pull it" % name)
    return p


class ComposeShards(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.result = compose_config(files=(SHARDS_FILE,))
        cls.config = yaml.safe_load(cls.result.stdout) \
            if cls.result.returncode == 0 else None
        with open(os.path.join(SOURCE_DIR, "deploy", "k8s", "base",
                               "retraced.toml"), "rb") as f:
            cls.retraced_toml = tomllib.load(f)
        # The shards' --store is the store's mount point (the scale-out
        # configuration file has no store key).
        cls.retraced_toml["store"] = "/var/lib/retrace/store"

    def setUp(self):
        self.assertEqual(self.result.returncode, 0,
                         "docker-compose config of docker-compose.shards.yml "
                         "failed:\n" + self.result.stderr)

    def test_no_warnings(self):
        self.assertNotIn("WARNING", self.result.stderr, self.result.stderr)

    def test_router_and_shards(self):
        problems = shard_problems(self.config, self.retraced_toml)
        self.assertEqual(problems, [], "\n".join(problems))

    def test_broken_copies_are_caught(self):
        same_gpu = yaml.safe_load(self.result.stdout)
        (same_gpu["services"]["shard-1"]["deploy"]["resources"]["reservations"]
         ["devices"][0]["device_ids"]) = ["0"]
        self.assertIn("shards share a GPU: device_ids ['0', '0']",
                      shard_problems(same_gpu, self.retraced_toml))
        one_listed = yaml.safe_load(self.result.stdout)
        command = one_listed["services"]["router"]["command"]
        command[command.index("--shards") + 1] = "shard-0:50051"
        self.assertTrue(any("router --shards" in q for q in
                            shard_problems(one_listed, self.retraced_toml)))
        wrong_part = yaml.safe_load(self.result.stdout)
        command = wrong_part["services"]["shard-1"]["command"]
        command[command.index("--shard-part") + 1] = "0/2"
        self.assertTrue(any("shard-1 must run" in q for q in
                            shard_problems(wrong_part, self.retraced_toml)))

    def test_prometheus_scrapes_router_and_shards(self):
        service = self.config["services"]["prometheus"]
        by_target = {t: (s, ro) for s, t, ro in mounts(service)}
        source, read_only = by_target["/etc/prometheus/prometheus.yml"]
        self.assertEqual(source,
                         os.path.join(SOURCE_DIR, "deploy", "prometheus-shards.yml"))
        self.assertTrue(read_only)
        with open(source, encoding="utf-8") as f:
            prometheus = yaml.safe_load(f)
        targets = {t for job in prometheus["scrape_configs"]
                   for sc in job.get("static_configs", [])
                   for t in sc["targets"]}
        port = int(self.retraced_toml["metrics-port"])
        expected = {"%s:%d" % (s, port) for s in self.config["services"]
                    if s == "router" or s.startswith("shard-")}
        self.assertEqual(targets, expected)

    def test_grafana_is_provisioned(self):
        service = self.config["services"]["grafana"]
        by_target = {t: (s, ro) for s, t, ro in mounts(service)}
        grafana_dir = os.path.join(SOURCE_DIR, "deploy", "grafana")
        self.assertEqual(by_target["/etc/grafana/provisioning"],
                         (os.path.join(grafana_dir, "provisioning"), True))
        dashboards_source, _ = by_target["/var/lib/grafana/dashboards"]
        self.assertEqual(dashboards_source, os.path.join(grafana_dir, "dashboards"))
        with open(os.path.join(grafana_dir, "provisioning", "dashboards",
                               "retrace.yaml")) as f:
            provider = yaml.safe_load(f)["providers"][0]
        self.assertEqual(provider["options"]["path"], "/var/lib/grafana/dashboards")
        with open(os.path.join(grafana_dir, "provisioning", "datasources",
                               "prometheus.yaml")) as f:
            datasource = yaml.safe_load(f)["datasources"][0]
        self.assertEqual(datasource["url"], "http://prometheus:9090")
        self.assertIn(9090, port_targets(self.config["services"]["prometheus"]))
        with open(os.path.join(grafana_dir, "dashboards", "retrace.json")) as f:
            dashboard = json.load(f)
        uids = {t["datasource"]["uid"] for panel in dashboard["panels"]
                for t in panel.get("targets", [])}
        self.assertEqual(uids, {datasource["uid"]})


if __name__ == "__main__":
    unittest.main(verbosity=2)
