"""Static checks of the Dockerfile, .dockerignore and deploy/retraced.toml.

No Docker engine is needed (none runs on the build machines): the Dockerfile
is parsed here and checked for what docs/operations.md promises about the
image, and for agreement between the files that must agree (ports, paths).

  - every stage is FROM the same Debian release (one ABI for build and run);
  - the final stage runs as a numeric non-root USER;
  - HEALTHCHECK asks the gRPC health service through `retrace health` on the
    port retraced listens on (deploy/retraced.toml);
  - VOLUME is the store path of deploy/retraced.toml; EXPOSE names the gRPC
    and metrics ports of that file;
  - ENTRYPOINT is retraced, exec form, with the image's config file, which a
    COPY puts where the ENTRYPOINT says;
  - the binaries come from the build stage, whose cmake call builds with CUDA;
  - .dockerignore keeps .git and build*/ trees out, but not a file a COPY
    needs.

Environment: RETRACE_SOURCE_DIR (the repository).
"""

import fnmatch
import json
import os
import re
import shlex
import sys
import tomllib
import unittest

SOURCE_DIR = os.environ.get("RETRACE_SOURCE_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))


def read(name):
    with open(os.path.join(SOURCE_DIR, name), encoding="utf-8") as f:
        return f.read()


def instructions(text):
    """(INSTRUCTION, arguments) pairs: comments dropped, continuations joined."""
    result = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        result.append((keyword.upper(), rest.strip()))
        current = ""
    return result


def stages(parsed):
    """Lists of instructions per stage; the ARGs before the first FROM first."""
    out = [[]]
    for ins in parsed:
        if ins[0] == "FROM":
            out.append([])
        out[-1].append(ins)
    return out


def exec_form(arguments):
    """The JSON array of an exec-form instruction, or None."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def expand(text, args):
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)),
                  text)


class Dockerfile(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.parsed = instructions(read("Dockerfile"))
        cls.stages = stages(cls.parsed)
        cls.final = cls.stages[-1]
        cls.config = tomllib.loads(read("deploy/retraced.toml"))
        cls.global_args = {}
        for keyword, rest in cls.stages[0]:
            if keyword == "ARG" and "=" in rest:
                name, value = rest.split("=", 1)
                cls.global_args[name] = value.strip('"')

    def final_values(self, keyword):
        return [rest for k, rest in self.final if k == keyword]

    def port(self, address_or_port):
        return int(str(address_or_port).rsplit(":", 1)[-1])

    def test_stages_share_one_debian_release(self):
        images = [expand(rest.split()[0], self.global_args)
                  for stage in self.stages[1:] for k, rest in stage
                  if k == "FROM"]
        self.assertGreaterEqual(len(images), 2, "expected a multi-stage build")
        releases = set()
        for image in images:
            match = re.fullmatch(r"debian:(\w+)(-slim)?", image)
            self.assertIsNotNone(match, "stage image %s is not Debian" % image)
            releases.add(match.group(1))
        self.assertEqual(releases, {"bookworm"},
                         "every stage must be on Debian 12 (bookworm)")

    def test_runs_as_a_numeric_non_root_user(self):
        users = self.final_values("USER")
        self.assertTrue(users, "the final stage sets no USER (it would be root)")
        user = users[-1].split(":")[0]
        self.assertRegex(user, r"^\d+$", "use a numeric uid (runAsNonRoot)")
        self.assertNotEqual(int(user), 0)

    def test_healthcheck_uses_the_grpc_health_service(self):
        checks = self.final_values("HEALTHCHECK")
        self.assertEqual(len(checks), 1)
        _, _, command = checks[0].partition("CMD")
        argv = exec_form(command.strip())
        self.assertIsNotNone(argv, "HEALTHCHECK CMD should be exec form")
        self.assertEqual(argv[:3], ["retrace", "health", "--server"])
        host, port = argv[3].rsplit(":", 1)
        self.assertEqual(host, "127.0.0.1")
        self.assertEqual(int(port), self.port(self.config["listen"]))
        self.assertIn("--start-period", checks[0])

    def test_volume_is_the_configured_store(self):
        volumes = []
        for rest in self.final_values("VOLUME"):
            volumes += exec_form(rest) or rest.split()
        self.assertIn(self.config["store"], volumes)
        self.assertEqual(self.config["store"], "/var/lib/retrace/store")

    def test_exposes_the_configured_ports(self):
        exposed = set()
        for rest in self.final_values("EXPOSE"):
            exposed |= {int(p.split("/")[0]) for p in rest.split()}
        self.assertEqual(exposed, {self.port(self.config["listen"]),
                                   int(self.config["metrics-port"])})
        self.assertEqual(exposed, {50051, 9464})

    def test_entrypoint_is_retraced_with_the_image_config(self):
        entrypoints = self.final_values("ENTRYPOINT")
        self.assertEqual(len(entrypoints), 1)
        argv = exec_form(entrypoints[0])
        self.assertIsNotNone(argv, "ENTRYPOINT should be exec form (signals "
                             "reach retraced, not a shell)")
        self.assertEqual(os.path.basename(argv[0]), "retraced")
        self.assertIn("--config", argv)
        config_path = argv[argv.index("--config") + 1]
        copies = [shlex.split(rest) for rest in self.final_values("COPY")]
        self.assertIn(["deploy/retraced.toml", config_path],
                      [c for c in copies if not c[0].startswith("--")])

    def test_binaries_come_from_the_cuda_build_stage(self):
        copies = [shlex.split(rest) for rest in self.final_values("COPY")]
        from_build = [c for c in copies if c[0] == "--from=build"]
        self.assertTrue(from_build, "no COPY --from=build in the final stage")
        build_stage = [s for s in self.stages[1:]
                       if s[0][1].split()[-1] == "build"]
        self.assertEqual(len(build_stage), 1, "one stage named 'build'")
        runs = " ".join(rest for k, rest in build_stage[0] if k == "RUN")
        self.assertIn("-DRETRACE_WITH_CUDA=ON", runs)
        for target in ("retraced", "retrace", "retrace-batch"):
            self.assertRegex(runs, r"--target [\w -]*\b%s\b" % re.escape(target))
        self.assertIn("deploy/runtime-packages.sh", runs)

    def test_stop_signal_is_sigterm(self):
        self.assertEqual(self.final_values("STOPSIGNAL"), ["SIGTERM"])


class DockerIgnore(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.patterns = [line.strip() for line in read(".dockerignore").splitlines()
                        if line.strip() and not line.strip().startswith("#")]

    def ignored(self, path):
        """Whether path (or a folder above it) matches a pattern. Enough for
        the patterns used here (no '!' exceptions)."""
        self.assertFalse(any(p.startswith("!") for p in self.patterns))
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            for pattern in self.patterns:
                pattern = pattern.rstrip("/")
                if pattern.startswith("**/"):
                    if fnmatch.fnmatchcase(parts[i - 1], pattern[3:]):
                        return True
                elif fnmatch.fnmatchcase(prefix, pattern):
                    return True
        return False

    def test_excludes_git_and_build_trees(self):
        for path in (".git/config", "build/CMakeCache.txt",
                     "build-deploy/build.ninja", "build-asan/x.o"):
            self.assertTrue(self.ignored(path), path)

    def test_keeps_what_the_image_build_copies(self):
        parsed = instructions(read("Dockerfile"))
        sources = []
        for keyword, rest in parsed:
            if keyword == "COPY":
                words = shlex.split(rest)
                if any(w.startswith("--from") for w in words):
                    continue
                sources += [w for w in words[:-1] if not w.startswith("--")]
        self.assertIn(".", sources)
        for source in sources:
            if source != ".":
                self.assertFalse(self.ignored(source), source)
        for needed in ("CMakeLists.txt", "proto/retrace/v1/attribution.proto",
                       "server/CMakeLists.txt", "kernels/CMakeLists.txt",
                       "deploy/runtime-packages.sh", "scripts/setup.sh"):
            self.assertFalse(self.ignored(needed), needed)
            self.assertTrue(os.path.exists(os.path.join(SOURCE_DIR, needed)),
                            needed)


if __name__ == "__main__":
    unittest.main(verbosity=2)
