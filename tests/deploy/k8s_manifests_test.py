"""deploy/k8s renders with kustomize and every object it renders is valid.

Renders deploy/k8s/base and every overlay with `kubectl kustomize` (Debian
12's kubernetes-client: kubectl 1.20 with kustomize v2.0.3; any newer kubectl
works too), then checks each rendered object

- against the Kubernetes v1.32 JSON schema of its kind, vendored in
  tests/deploy/k8s-schemas (strict: an unknown or misspelt field fails), and
- for what a schema cannot see: the number of parts N agrees everywhere (the
  retrace-shards ConfigMap, the StatefulSet's replicas, the Indexed Job's
  completions and parallelism, the router's list of shard names, the
  --shard-part and --shard arguments), probes point at retraced's gRPC port,
  the grace period exceeds the drain timeout, selectors match the pods'
  labels, every referenced ConfigMap, Secret (and key), PVC, Service and
  scale target exists in the render, every $(VAR) in a command line is a
  declared environment variable, and the pods run as uid 10001 with a
  read-only root filesystem.

Kubernetes cannot validate offline: even `kubectl create --dry-run=client`
asks the API server for its resource types, hence the vendored schemas.

The negative cases break a copy on purpose (a wrong selector, a missing
Secret, disagreeing part counts, ...) and require each check to report it, so
that a check that can no longer fail is noticed.

router-tls's Secrets come from files that are never committed; the test
renders a copy of deploy/k8s with placeholder files in their place.

Exit status 77 (skipped) when kubectl or python3-jsonschema is missing.
Environment: RETRACE_SOURCE_DIR (the repository); RETRACE_KUBECTL (optional,
the kubectl to use instead of the one on PATH).
"""

import copy
import glob
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
K8S_DIR = os.path.join(SOURCE_DIR, "deploy", "k8s")
SCHEMA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "k8s-schemas")
# Every kustomization that is meant to be applied, relative to deploy/k8s.
TARGETS = ("base", "overlays/four-shards", "overlays/router-tls")

GRPC_PORT = 50051
METRICS_PORT = 9464
UID = 10001
# Loading hashes and copies a large store: the startup probe must allow it.
MIN_STARTUP_BUDGET_S = 30 * 60
SHARD_COUNT_CONFIGMAP = "retrace-shards"

KUBECTL = os.environ.get("RETRACE_KUBECTL") or shutil.which("kubectl")
if not KUBECTL:
    print("SKIPPED: kubectl is not installed (Debian: kubernetes-client; "
          "scripts/setup.sh lists it)")
    sys.exit(SKIP)
try:
    import jsonschema
    import yaml
except ImportError as e:
    print("SKIPPED: %s cannot import jsonschema or yaml (Debian: "
          "python3-jsonschema, python3-yaml): %s" % (sys.executable, e))
    sys.exit(SKIP)


# --- rendering ---------------------------------------------------------------

def write_placeholder_secrets(k8s_copy):
    """The files router-tls's secretGenerator reads; contents are never used."""
    secrets = os.path.join(k8s_copy, "overlays", "router-tls", "secrets")
    os.makedirs(secrets, exist_ok=True)
    for name in ("server.pem", "server.key", "ca.pem", "tokens.txt"):
        with open(os.path.join(secrets, name), "w") as f:
            f.write("placeholder for deploy_k8s_manifests\n")


def render(k8s_dir, target):
    """The objects `kubectl kustomize` renders for k8s_dir/target."""
    run = subprocess.run([KUBECTL, "kustomize", os.path.join(k8s_dir, target)],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, HOME=tempfile.gettempdir()))
    if run.returncode != 0:
        raise AssertionError("kubectl kustomize %s failed:\n%s"
                             % (target, run.stderr))
    return [d for d in yaml.safe_load_all(run.stdout) if d]


# --- checks ------------------------------------------------------------------

SCHEMA_FILES = {
    ("v1", "ConfigMap"): "configmap-v1.json",
    ("v1", "Secret"): "secret-v1.json",
    ("v1", "Service"): "service-v1.json",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaim-v1.json",
    ("apps/v1", "Deployment"): "deployment-apps-v1.json",
    ("apps/v1", "StatefulSet"): "statefulset-apps-v1.json",
    ("batch/v1", "Job"): "job-batch-v1.json",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudget-policy-v1.json",
    ("autoscaling/v2", "HorizontalPodAutoscaler"):
        "horizontalpodautoscaler-autoscaling-v2.json",
}
_validators = {}


def schema_problems(obj):
    key = (obj.get("apiVersion"), obj.get("kind"))
    name = "%s/%s" % (key[1], obj.get("metadata", {}).get("name"))
    if key not in SCHEMA_FILES:
        return ["%s: no vendored schema for %s %s (tests/deploy/k8s-schemas)"
                % (name, key[0], key[1])]
    if key not in _validators:
        with open(os.path.join(SCHEMA_DIR, SCHEMA_FILES[key])) as f:
            schema = json.load(f)
        _validators[key] = jsonschema.Draft7Validator(schema)
    return ["%s: schema: %s at %s" % (name, e.message,
                                      "/".join(map(str, e.absolute_path)))
            for e in _validators[key].iter_errors(obj)]


def by_kind(objs, kind):
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def base_name(generated):
    """retraced-config-742m5f92ft -> retraced-config (kustomize's hash)."""
    return re.sub(r"-[a-z0-9]{10}$", "", generated)


def find_generated(objs, kind, name):
    """The object of that kind whose name is name, with or without a hash."""
    for o in objs:
        if o["kind"] == kind and base_name(o["metadata"]["name"]) == name:
            return o
    return None


def workloads(objs):
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "Job")]


def pod_spec(workload):
    return workload["spec"]["template"]["spec"]


def matches(selector_labels, labels):
    return bool(selector_labels) and all(
        labels.get(k) == v for k, v in selector_labels.items())


def retraced_toml(objs):
    cm = find_generated(objs, "ConfigMap", "retraced-config")
    if cm is None:
        return None
    return tomllib.loads(cm["data"]["retraced.toml"])


def arg_after(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def semantic_problems(objs):
    p = []
    names = {}
    for o in objs:
        key = (o["kind"], o["metadata"]["name"])
        if key in names:
            p.append("%s/%s rendered twice" % key)
        names[key] = o
        if "namespace" in o["metadata"]:
            p.append("%s/%s names a namespace; the manifests are "
                     "namespace-agnostic" % key)

    configmaps = by_kind(objs, "ConfigMap")
    secrets = by_kind(objs, "Secret")
    services = by_kind(objs, "Service")
    pvcs = by_kind(objs, "PersistentVolumeClaim")
    statefulsets = by_kind(objs, "StatefulSet")
    deployments = by_kind(objs, "Deployment")
    jobs = by_kind(objs, "Job")

    toml = retraced_toml(objs)
    if toml is None:
        p.append("ConfigMap retraced-config (retraced.toml) is not in the render")
        toml = {}
    listen_port = int(str(toml.get("listen", ":0")).rsplit(":", 1)[1])
    if listen_port != GRPC_PORT:
        p.append("retraced.toml listens on %d, the probes and Services expect %d"
                 % (listen_port, GRPC_PORT))
    if toml.get("metrics-port") != METRICS_PORT:
        p.append("retraced.toml's metrics-port is %r, expected %d"
                 % (toml.get("metrics-port"), METRICS_PORT))
    drain = float(toml.get("drain-timeout-s", 30))

    # --- workloads: selectors, references, security, probes, grace
    for w in workloads(objs):
        wname = "%s/%s" % (w["kind"], w["metadata"]["name"])
        spec = pod_spec(w)
        labels = w["spec"]["template"]["metadata"].get("labels", {})
        if w["kind"] != "Job":
            sel = w["spec"]["selector"].get("matchLabels", {})
            if not matches(sel, labels):
                p.append("%s: selector %s does not match its pod labels %s"
                         % (wname, sel, labels))
        sc = spec.get("securityContext", {})
        if sc.get("runAsNonRoot") is not True or sc.get("runAsUser") != UID:
            p.append("%s: pods must run as non-root uid %d" % (wname, UID))
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v and v["configMap"]["name"] not in configmaps:
                p.append("%s: volume %s: ConfigMap %s is not in the render"
                         % (wname, v["name"], v["configMap"]["name"]))
            if "secret" in v and v["secret"]["secretName"] not in secrets:
                p.append("%s: volume %s: Secret %s is not in the render"
                         % (wname, v["name"], v["secret"]["secretName"]))
            pvc = v.get("persistentVolumeClaim")
            if pvc and pvc["claimName"] not in pvcs:
                p.append("%s: volume %s: PersistentVolumeClaim %s is not in "
                         "the render" % (wname, v["name"], pvc["claimName"]))
        runs_retraced = False
        for c in spec["containers"]:
            cname = "%s container %s" % (wname, c["name"])
            csc = c.get("securityContext", {})
            if csc.get("readOnlyRootFilesystem") is not True or \
                    csc.get("allowPrivilegeEscalation") is not False:
                p.append("%s: needs readOnlyRootFilesystem: true and "
                         "allowPrivilegeEscalation: false" % cname)
            env = env_of(c)
            for e in env.values():
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    cm = configmaps.get(ref["name"])
                    if cm is None:
                        p.append("%s: env %s: ConfigMap %s is not in the render"
                                 % (cname, e["name"], ref["name"]))
                    elif ref["key"] not in cm.get("data", {}):
                        p.append("%s: env %s: ConfigMap %s has no key %s"
                                 % (cname, e["name"], ref["name"], ref["key"]))
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] not in secrets:
                    p.append("%s: env %s: Secret %s is not in the render"
                             % (cname, e["name"], ref["name"]))
            # Kubernetes leaves an undefined $(VAR) in place, verbatim.
            for word in c.get("command", []) + c.get("args", []):
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", word):
                    if var not in env:
                        p.append("%s: $(%s) in its command line is not one of "
                                 "its env variables" % (cname, var))
            for m in c.get("volumeMounts", []):
                v = volumes.get(m["name"])
                if v is None:
                    p.append("%s: mounts volume %s, which the pod lacks"
                             % (cname, m["name"]))
                elif "configMap" in v and "subPath" in m:
                    cm = configmaps.get(v["configMap"]["name"], {})
                    if m["subPath"] not in cm.get("data", {}):
                        p.append("%s: subPath %s is not a key of ConfigMap %s"
                                 % (cname, m["subPath"], v["configMap"]["name"]))
            if c.get("command") not in (None, ["retraced"]):
                continue  # retrace-batch: a Job, no server
            runs_retraced = True
            ports = {pt.get("name"): pt["containerPort"] for pt in c.get("ports", [])}
            if ports.get("grpc") != GRPC_PORT or ports.get("metrics") != METRICS_PORT:
                p.append("%s: ports grpc/metrics must be %d/%d, are %s"
                         % (cname, GRPC_PORT, METRICS_PORT, ports))
            tls = "--tls-cert" in c.get("args", [])
            for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(probe_kind)
                if probe is None:
                    continue
                if "grpc" in probe:
                    if probe["grpc"].get("port") != GRPC_PORT:
                        p.append("%s: %s asks port %s, retraced serves gRPC on %d"
                                 % (cname, probe_kind, probe["grpc"].get("port"),
                                    GRPC_PORT))
                    if tls:
                        p.append("%s: %s is a gRPC probe, which speaks plaintext "
                                 "only, but the server has --tls-cert"
                                 % (cname, probe_kind))
                if "httpGet" in probe:
                    port = probe["httpGet"]["port"]
                    if ports.get(port, port) != METRICS_PORT:
                        p.append("%s: %s asks HTTP port %s; retraced serves HTTP "
                                 "(/metrics) on %d only"
                                 % (cname, probe_kind, port, METRICS_PORT))
            if c.get("readinessProbe") is None:
                p.append("%s: no readinessProbe" % cname)
            if c.get("livenessProbe") is None:
                p.append("%s: no livenessProbe" % cname)
        if runs_retraced:
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if not grace > drain:
                p.append("%s: terminationGracePeriodSeconds %s is not longer "
                         "than drain-timeout-s %s" % (wname, grace, drain))

    # --- Services, PDBs, HPAs select or name something real
    pod_labels = [(w, w["spec"]["template"]["metadata"].get("labels", {}))
                  for w in workloads(objs) if w["kind"] != "Job"]
    for s in services.values():
        sel = s["spec"].get("selector", {})
        if not any(matches(sel, l) for _, l in pod_labels):
            p.append("Service/%s: selector %s selects no pods"
                     % (s["metadata"]["name"], sel))
    for pdb in by_kind(objs, "PodDisruptionBudget").values():
        sel = pdb["spec"]["selector"].get("matchLabels", {})
        if not any(matches(sel, l) for _, l in pod_labels):
            p.append("PodDisruptionBudget/%s: selector %s selects no pods"
                     % (pdb["metadata"]["name"], sel))
    for hpa in by_kind(objs, "HorizontalPodAutoscaler").values():
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) not in names:
            p.append("HorizontalPodAutoscaler/%s: scale target %s/%s is not in "
                     "the render" % (hpa["metadata"]["name"], ref["kind"],
                                     ref["name"]))
        elif ref["kind"] == "StatefulSet":
            p.append("HorizontalPodAutoscaler/%s scales the shards, whose number "
                     "is the store's number of parts" % hpa["metadata"]["name"])

    # --- the shards, the build and the router agree on N
    shard_sets = [s for s in statefulsets.values()
                  if arg_after(s_args(s), "--role") == "shard"]
    if len(shard_sets) != 1:
        p.append("expected one StatefulSet running --role shard, found %d"
                 % len(shard_sets))
        return p
    sts = shard_sets[0]
    sts_name = sts["metadata"]["name"]
    counts = find_generated(objs, "ConfigMap", SHARD_COUNT_CONFIGMAP)
    if counts is None:
        p.append("ConfigMap %s is not in the render" % SHARD_COUNT_CONFIGMAP)
        return p
    n = int(counts["data"]["count"])
    if sts["spec"].get("replicas") != n:
        p.append("StatefulSet/%s has %s replicas but %s says count=%d"
                 % (sts_name, sts["spec"].get("replicas"),
                    SHARD_COUNT_CONFIGMAP, n))
    shard_c = pod_spec(sts)["containers"][0]
    if arg_after(shard_c["args"], "--shard-part") != "$(POD_INDEX)/$(SHARD_COUNT)":
        p.append("StatefulSet/%s: --shard-part must be $(POD_INDEX)/$(SHARD_COUNT)"
                 % sts_name)
    env = env_of(shard_c)
    if env.get("POD_INDEX", {}).get("valueFrom", {}).get("fieldRef", {}) \
            .get("fieldPath") != "metadata.labels['apps.kubernetes.io/pod-index']":
        p.append("StatefulSet/%s: POD_INDEX must come from the pod-index label"
                 % sts_name)
    if env.get("SHARD_COUNT", {}).get("valueFrom", {}).get("configMapKeyRef", {}) \
            != {"name": counts["metadata"]["name"], "key": "count"}:
        p.append("StatefulSet/%s: SHARD_COUNT must be %s's count"
                 % (sts_name, SHARD_COUNT_CONFIGMAP))
    limits = shard_c.get("resources", {}).get("limits", {})
    if str(limits.get("nvidia.com/gpu")) != "1":
        p.append("StatefulSet/%s: each shard needs limits nvidia.com/gpu: 1"
                 % sts_name)
    startup = shard_c.get("startupProbe")
    if not startup or "grpc" not in startup:
        p.append("StatefulSet/%s: needs a gRPC startupProbe" % sts_name)
    else:
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        if budget < MIN_STARTUP_BUDGET_S:
            p.append("StatefulSet/%s: startupProbe allows %d s to load, less "
                     "than %d s" % (sts_name, budget, MIN_STARTUP_BUDGET_S))
    for probe_kind in ("readinessProbe", "livenessProbe"):
        if "grpc" not in shard_c.get(probe_kind, {}):
            p.append("StatefulSet/%s: %s must be a gRPC probe" % (sts_name, probe_kind))

    headless = services.get(sts["spec"]["serviceName"])
    if headless is None:
        p.append("StatefulSet/%s: serviceName %s is not in the render"
                 % (sts_name, sts["spec"]["serviceName"]))
    else:
        if headless["spec"].get("clusterIP") != "None":
            p.append("Service/%s must be headless (clusterIP: None)"
                     % headless["metadata"]["name"])
        if "publishNotReadyAddresses" not in headless["spec"]:
            p.append("Service/%s: publishNotReadyAddresses must be set explicitly"
                     % headless["metadata"]["name"])
        if not matches(headless["spec"].get("selector", {}),
                       sts["spec"]["template"]["metadata"]["labels"]):
            p.append("Service/%s does not select StatefulSet/%s's pods"
                     % (headless["metadata"]["name"], sts_name))

    builds = [j for j in jobs.values()
              if "build-store" in pod_spec(j)["containers"][0].get("args", [])]
    if len(builds) != 1:
        p.append("expected one Job running build-store, found %d" % len(builds))
    for j in builds:
        jname = "Job/%s" % j["metadata"]["name"]
        if j["spec"].get("completionMode") != "Indexed":
            p.append("%s must be completionMode: Indexed" % jname)
        if j["spec"].get("completions") != n:
            p.append("%s has completions %s but %s says count=%d"
                     % (jname, j["spec"].get("completions"),
                        SHARD_COUNT_CONFIGMAP, n))
        if j["spec"].get("parallelism", 1) > n:
            p.append("%s: parallelism exceeds the number of parts" % jname)
        c = pod_spec(j)["containers"][0]
        if arg_after(c["args"], "--shard") != "$(JOB_COMPLETION_INDEX)/$(SHARD_COUNT)":
            p.append("%s: --shard must be $(JOB_COMPLETION_INDEX)/$(SHARD_COUNT)"
                     % jname)
        if env_of(c).get("SHARD_COUNT", {}).get("valueFrom", {}) \
                .get("configMapKeyRef", {}).get("name") != counts["metadata"]["name"]:
            p.append("%s: SHARD_COUNT must be %s's count"
                     % (jname, SHARD_COUNT_CONFIGMAP))
    joins = [j for j in jobs.values()
             if "join-store" in pod_spec(j)["containers"][0].get("args", [])]
    if len(joins) != 1:
        p.append("expected one Job running join-store, found %d" % len(joins))

    expected = ["%s-%d.%s:%d" % (sts_name, i, sts["spec"]["serviceName"], GRPC_PORT)
                for i in range(n)]
    if counts["data"].get("shards", "").split(",") != expected:
        p.append("%s's shards %r must name the %d StatefulSet pods in order: %s"
                 % (SHARD_COUNT_CONFIGMAP, counts["data"].get("shards"), n,
                    ",".join(expected)))
    routers = [d for d in deployments.values()
               if arg_after(s_args(d), "--role") == "router"]
    if len(routers) != 1:
        p.append("expected one Deployment running --role router, found %d"
                 % len(routers))
    for d in routers:
        c = pod_spec(d)["containers"][0]
        if arg_after(c["args"], "--shards") != "$(SHARDS)" or \
                env_of(c).get("SHARDS", {}).get("valueFrom", {}) \
                .get("configMapKeyRef") != {"name": counts["metadata"]["name"],
                                            "key": "shards"}:
            p.append("Deployment/%s: --shards must be $(SHARDS) from %s's shards"
                     % (d["metadata"]["name"], SHARD_COUNT_CONFIGMAP))
    return p


def s_args(workload):
    return pod_spec(workload)["containers"][0].get("args", [])


def all_problems(objs):
    p = []
    for o in objs:
        p += schema_problems(o)
    return p + semantic_problems(objs)


# --- tests -------------------------------------------------------------------

class Rendered(unittest.TestCase):
    """Every kustomization renders and passes every check."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.k8s = os.path.join(cls.tmp.name, "k8s")
        shutil.copytree(K8S_DIR, cls.k8s,
                        ignore=shutil.ignore_patterns("secrets"))
        write_placeholder_secrets(cls.k8s)
        cls.renders = {t: render(cls.k8s, t) for t in TARGETS}

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_every_target_is_valid(self):
        for target, objs in self.renders.items():
            with self.subTest(target=target):
                problems = all_problems(objs)
                self.assertEqual(problems, [], "\n".join(problems))

    def test_every_kustomization_is_a_target(self):
        found = {os.path.relpath(os.path.dirname(k), K8S_DIR) for k in
                 glob.glob(os.path.join(K8S_DIR, "**", "kustomization.yaml"),
                           recursive=True)}
        self.assertEqual(found, set(TARGETS))

    def test_overlays_change_the_number_of_parts(self):
        def n(objs):
            return int(find_generated(objs, "ConfigMap", SHARD_COUNT_CONFIGMAP)
                       ["data"]["count"])
        self.assertEqual(n(self.renders["base"]), 2)
        self.assertEqual(n(self.renders["overlays/four-shards"]), 4)
        self.assertEqual(n(self.renders["overlays/router-tls"]), 4)

    def test_the_kinds_the_brief_needs(self):
        kinds = {o["kind"] for o in self.renders["overlays/router-tls"]}
        self.assertLessEqual(
            {"StatefulSet", "Service", "Deployment", "Job", "ConfigMap",
             "Secret", "PodDisruptionBudget", "HorizontalPodAutoscaler",
             "PersistentVolumeClaim"}, kinds)

    def test_router_tls_serves_tls_and_tokens(self):
        objs = self.renders["overlays/router-tls"]
        router = by_kind(objs, "Deployment")["retrace-router"]
        args = s_args(router)
        for flag in ("--tls-cert", "--tls-key", "--token-file"):
            self.assertIn(flag, args)
        self.assertNotIn("--tls-cert", s_args(by_kind(objs, "StatefulSet")
                                              ["retrace-shard"]))

    def test_config_keys_are_retraced_flags(self):
        with open(os.path.join(SOURCE_DIR, "docs", "operations.md")) as f:
            documented = set(re.findall(r"`--(?:\[no-\])?([a-z0-9-]+)", f.read()))
        toml = retraced_toml(self.renders["base"])
        self.assertLessEqual(set(toml), documented,
                             "retraced.toml keys that are no documented flag")


class BrokenCopies(unittest.TestCase):
    """Each check reports what it exists for."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.k8s = os.path.join(cls.tmp.name, "k8s")
        shutil.copytree(K8S_DIR, cls.k8s,
                        ignore=shutil.ignore_patterns("secrets"))
        write_placeholder_secrets(cls.k8s)
        cls.base = render(cls.k8s, "base")
        cls.tls = render(cls.k8s, "overlays/router-tls")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def broken(self, objs, kind, name, change):
        objs = copy.deepcopy(objs)
        for o in objs:
            if o["kind"] == kind and base_name(o["metadata"]["name"]) == name:
                change(o)
                return objs
        self.fail("%s/%s not rendered" % (kind, name))

    def assertReports(self, objs, fragment):
        problems = all_problems(objs)
        self.assertTrue(any(fragment in q for q in problems),
                        "expected a problem containing %r, got:\n%s"
                        % (fragment, "\n".join(problems) or "(none)"))

    def test_misspelt_field(self):
        def change(o):
            c = pod_spec(o)["containers"][0]
            c["readinesProbe"] = c.pop("readinessProbe")
        self.assertReports(self.broken(self.base, "StatefulSet", "retrace-shard",
                                       change), "schema: Additional properties")

    def test_wrong_type(self):
        def change(o):
            o["spec"]["replicas"] = "two"
        self.assertReports(self.broken(self.base, "Deployment", "retrace-router",
                                       change), "schema: 'two' is not of type")

    def test_unknown_kind(self):
        objs = self.base + [{"apiVersion": "v1", "kind": "Pod",
                             "metadata": {"name": "x"}}]
        self.assertReports(objs, "no vendored schema for v1 Pod")

    def test_service_selects_no_pods(self):
        def change(o):
            o["spec"]["selector"]["app.kubernetes.io/component"] = "shards"
        objs = self.broken(self.base, "Service", "retrace-shard", change)
        self.assertReports(objs, "Service/retrace-shard: selector")
        self.assertReports(objs, "does not select StatefulSet/retrace-shard")

    def test_selector_does_not_match_the_pods(self):
        def change(o):
            o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] = "x"
        self.assertReports(self.broken(self.base, "Deployment", "retrace-router",
                                       change),
                           "Deployment/retrace-router: selector")

    def test_pdb_selects_no_pods(self):
        def change(o):
            o["spec"]["selector"]["matchLabels"] = {"app": "retraced"}
        self.assertReports(self.broken(self.base, "PodDisruptionBudget",
                                       "retrace-shard", change),
                           "PodDisruptionBudget/retrace-shard: selector")

    def test_missing_secret(self):
        objs = [o for o in copy.deepcopy(self.tls)
                if not (o["kind"] == "Secret"
                        and base_name(o["metadata"]["name"]) == "retrace-tokens")]
        self.assertReports(objs, "Secret retrace-tokens-")

    def test_missing_configmap(self):
        objs = [o for o in copy.deepcopy(self.base)
                if not (o["kind"] == "ConfigMap"
                        and base_name(o["metadata"]["name"]) == "retraced-config")]
        self.assertReports(objs, "ConfigMap retraced-config")

    def test_missing_pvc(self):
        objs = [o for o in copy.deepcopy(self.base)
                if o["kind"] != "PersistentVolumeClaim"]
        self.assertReports(objs, "PersistentVolumeClaim retrace-data is not")

    def test_replicas_disagree_with_the_count(self):
        def change(o):
            o["spec"]["replicas"] = 3
        self.assertReports(self.broken(self.base, "StatefulSet", "retrace-shard",
                                       change), "has 3 replicas but")

    def test_completions_disagree_with_the_count(self):
        def change(o):
            o["spec"]["completions"] = 3
        self.assertReports(self.broken(self.base, "Job", "retrace-build-store",
                                       change), "has completions 3 but")

    def test_router_list_misses_a_shard(self):
        def change(o):
            o["data"]["shards"] = o["data"]["shards"].split(",")[0]
        self.assertReports(self.broken(self.base, "ConfigMap", "retrace-shards",
                                       change), "must name the 2 StatefulSet pods")

    def test_shard_part_argument(self):
        def change(o):
            args = pod_spec(o)["containers"][0]["args"]
            args[args.index("--shard-part") + 1] = "$(POD_INDEX)/2"
        self.assertReports(self.broken(self.base, "StatefulSet", "retrace-shard",
                                       change), "--shard-part must be")

    def test_undefined_variable(self):
        def change(o):
            args = pod_spec(o)["containers"][0]["args"]
            args[args.index("--shard") + 1] = "$(JOB_INDEX)/$(SHARD_COUNT)"
        objs = self.broken(self.base, "Job", "retrace-build-store", change)
        self.assertReports(objs, "$(JOB_INDEX) in its command line")

    def test_probe_on_another_port(self):
        def change(o):
            pod_spec(o)["containers"][0]["livenessProbe"]["grpc"]["port"] = 50052
        self.assertReports(self.broken(self.base, "StatefulSet", "retrace-shard",
                                       change), "livenessProbe asks port 50052")

    def test_grpc_probe_with_tls(self):
        def change(o):
            pod_spec(o)["containers"][0]["readinessProbe"] = {
                "grpc": {"port": GRPC_PORT}}
        self.assertReports(self.broken(self.tls, "Deployment", "retrace-router",
                                       change), "speaks plaintext only")

    def test_grace_period_shorter_than_the_drain(self):
        def change(o):
            pod_spec(o)["terminationGracePeriodSeconds"] = 30
        self.assertReports(self.broken(self.base, "StatefulSet", "retrace-shard",
                                       change), "is not longer than drain-timeout-s")

    def test_short_startup_budget(self):
        def change(o):
            pod_spec(o)["containers"][0]["startupProbe"]["failureThreshold"] = 30
        self.assertReports(self.broken(self.base, "StatefulSet", "retrace-shard",
                                       change), "startupProbe allows 300 s")

    def test_runs_as_root(self):
        def change(o):
            pod_spec(o)["securityContext"]["runAsUser"] = 0
        self.assertReports(self.broken(self.base, "Deployment", "retrace-router",
                                       change), "must run as non-root uid")

    def test_no_gpu(self):
        def change(o):
            del pod_spec(o)["containers"][0]["resources"]["limits"]
        self.assertReports(self.broken(self.base, "StatefulSet", "retrace-shard",
                                       change), "nvidia.com/gpu: 1")

    def test_hpa_target_missing(self):
        def change(o):
            o["spec"]["scaleTargetRef"]["name"] = "retrace-routers"
        self.assertReports(self.broken(self.base, "HorizontalPodAutoscaler",
                                       "retrace-router", change),
                           "scale target Deployment/retrace-routers")

    def test_overlay_that_forgets_the_statefulset(self):
        # Through kustomize: an overlay raising N without the StatefulSet.
        patch = os.path.join(self.k8s, "overlays", "four-shards", "shard-count.yaml")
        with open(patch) as f:
            original = f.read()
        try:
            with open(patch, "w") as f:
                f.write(original.replace("replicas: 4", "replicas: 2"))
            objs = render(self.k8s, "overlays/four-shards")
        finally:
            with open(patch, "w") as f:
                f.write(original)
        self.assertReports(objs, "has 2 replicas but retrace-shards says count=4")


if __name__ == "__main__":
    unittest.main(verbosity=2)
