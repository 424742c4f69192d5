"""Static checks of Dockerfile.gpu, the GPU node image with a CUDA LibTorch.

No Docker engine is needed (none runs on the build machines). What
docs/operations.md ("The GPU image") promises is checked on the parsed file:

  - two stages, each FROM a Debian 12 image pinned by a dated tag (never a
    floating tag or `latest`), the same date in both, the runtime one slim;
    a digest, where given, is a full sha256;
  - the LibTorch pin: an exact torch==X.Y.Z+cuNNN from PyTorch's index for
    that CUDA, the CUDA toolkit package of the same CUDA version, and a check
    in the build that the installed wheel reports that CUDA;
  - the build is scripts/build-node.sh: run here with --dry-run, the
    arguments the Dockerfile gives it configure a CUDA build against the
    wheel's LibTorch with the toolkit's nvcc, and build retraced, retrace and
    retrace-batch; scripts/gpu-node-check.sh (the bare GPU machine) calls the
    same script or, failing that, configures with the same essentials;
  - Debian's CPU LibTorch stays out (setup.sh --without-torch), and the
    runtime package list leaves out only what the image carries itself;
  - the runtime stage: numeric non-root USER, the same HEALTHCHECK, EXPOSE,
    VOLUME, STOPSIGNAL, ENTRYPOINT and CMD as the CPU image (one interface
    for both), the NVIDIA Container Toolkit variables with a CUDA requirement
    that matches the pin, and an ldd check that fails the build when a
    library is missing;
  - .dockerignore keeps every file Dockerfile.gpu copies.

Environment: RETRACE_SOURCE_DIR (the repository).
"""

import os
import re
import shlex
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dockerfile_test  # noqa: E402  (the parser and the CPU image's checks)
from dockerfile_test import exec_form, instructions, read, stages  # noqa: E402

SOURCE_DIR = dockerfile_test.SOURCE_DIR
PINNED_DEBIAN = re.compile(
    r"debian:bookworm-(?P<date>\d{8})(?P<slim>-slim)?(?:@sha256:(?P<digest>[0-9a-f]+))?")


def args_with_defaults(parsed):
    """ARG name -> default over the whole file (global and per stage)."""
    out = {}
    for keyword, rest in parsed:
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            out[name] = value.strip('"')
    return out


def expand(text, args):
    """${NAME} and ${NAME/./-} (bash's first-match substitution) from args."""
    def one(match):
        name, pattern, replacement = match.group(1), match.group(3), match.group(4)
        if name not in args:
            return match.group(0)
        value = args[name]
        return value.replace(pattern, replacement, 1) if pattern else value
    return re.sub(r"\$\{(\w+)(/([^/}]*)/([^}]*))?\}", one, text)


def stage_named(all_stages, name):
    found = [s for s in all_stages[1:] if s[0][1].split()[-1] == name]
    assert len(found) == 1, "expected one stage named %r" % name
    return found[0]


class DockerfileGpu(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.text = read("Dockerfile.gpu")
        cls.parsed = instructions(cls.text)
        cls.stages = stages(cls.parsed)
        cls.args = args_with_defaults(cls.parsed)
        cls.build = stage_named(cls.stages, "build")
        cls.final = cls.stages[-1]
        cls.build_runs = [expand(rest, cls.args) for k, rest in cls.build
                          if k == "RUN"]
        cpu = instructions(read("Dockerfile"))
        cls.cpu_final = stages(cpu)[-1]

    def final_values(self, keyword, stage=None):
        return [rest for k, rest in (stage or self.final) if k == keyword]

    # --- base images ----------------------------------------------------------

    def test_stages_are_pinned_debian_12(self):
        images = [expand(rest.split()[0], self.args)
                  for stage in self.stages[1:] for k, rest in stage if k == "FROM"]
        self.assertEqual(len(images), 2, "expected a build and a runtime stage")
        dates = set()
        for image in images:
            self.assertNotIn("latest", image)
            match = PINNED_DEBIAN.fullmatch(image)
            self.assertIsNotNone(
                match, "%s is not debian:bookworm-YYYYMMDD[-slim][@sha256:...]" % image)
            if match.group("digest") is not None:
                self.assertEqual(len(match.group("digest")), 64, image)
            dates.add(match.group("date"))
        self.assertEqual(len(dates), 1, "both stages from the same Debian build")
        self.assertIsNotNone(PINNED_DEBIAN.fullmatch(images[-1]).group("slim"),
                             "the runtime stage should be the slim image")

    def test_no_latest_anywhere(self):
        for keyword, rest in self.parsed:
            self.assertNotRegex(rest, r":latest\b", "%s %s" % (keyword, rest))

    # --- LibTorch and CUDA pins ----------------------------------------------

    def test_torch_and_cuda_versions_are_exact_and_agree(self):
        self.assertRegex(self.args["TORCH_VERSION"], r"^\d+\.\d+\.\d+$")
        self.assertRegex(self.args["CUDA_VERSION"], r"^\d+\.\d+$")
        self.assertEqual(self.args["TORCH_CUDA"],
                         "cu" + self.args["CUDA_VERSION"].replace(".", ""),
                         "the wheel's CUDA must be the toolkit's")

    def test_wheel_is_installed_by_exact_version_from_its_cuda_index(self):
        runs = " ".join(self.build_runs)
        want = "torch==%s+%s" % (self.args["TORCH_VERSION"], self.args["TORCH_CUDA"])
        self.assertIn('"%s"' % want, runs)
        self.assertIn("https://download.pytorch.org/whl/%s" % self.args["TORCH_CUDA"],
                      runs)
        # The build stops when the wheel's CUDA is not the toolkit's.
        self.assertIn("torch.version.cuda == '%s'" % self.args["CUDA_VERSION"], runs)

    def test_toolkit_package_matches_the_cuda_version(self):
        runs = " ".join(self.build_runs)
        self.assertIn('"cuda-toolkit-%s"' % self.args["CUDA_VERSION"].replace(".", "-"),
                      runs)
        self.assertIn("developer.download.nvidia.com/compute/cuda/repos/debian12/",
                      runs)

    def test_debian_cpu_libtorch_is_left_out(self):
        runs = " ".join(self.build_runs)
        self.assertIn("scripts/setup.sh --without-torch", runs)
        self.assertNotIn("libtorch-dev", runs)

    # --- the shared build command ---------------------------------------------

    def build_node_argv(self):
        for run in self.build_runs:
            words = shlex.split(run)
            for i, word in enumerate(words):
                if word.endswith("scripts/build-node.sh"):
                    end = words.index("&&", i) if "&&" in words[i:] else len(words)
                    return words[i + 1:end]
        self.fail("no RUN calls scripts/build-node.sh")

    def test_build_uses_build_node_with_the_wheels_libtorch(self):
        argv = self.build_node_argv()
        self.assertIn("--torch-python", argv)
        self.assertEqual(argv[argv.index("--torch-python") + 1],
                         "/opt/torch/bin/python")
        self.assertIn("--no-tests", argv)
        targets = [argv[i + 1] for i, a in enumerate(argv) if a == "--target"]
        self.assertEqual(sorted(targets), ["retrace", "retrace-batch", "retraced"])

    def test_build_node_dry_run_configures_a_cuda_build(self):
        argv = self.build_node_argv()
        # No wheel here: give its prefix directly, as --torch-python would.
        i = argv.index("--torch-python")
        argv = argv[:i] + ["--torch-prefix", "/opt/torch/share/cmake"] + argv[i + 2:]
        result = subprocess.run(
            ["bash", os.path.join(SOURCE_DIR, "scripts", "build-node.sh"),
             "--dry-run"] + argv,
            capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = [l for l in result.stdout.splitlines() if l.startswith("+ cmake")]
        self.assertEqual(len(lines), 2, result.stdout)
        configure, build = (shlex.split(l[2:]) for l in lines)
        self.assertIn("-DRETRACE_WITH_CUDA=ON", configure)
        self.assertIn("-DCMAKE_PREFIX_PATH=/opt/torch/share/cmake", configure)
        self.assertIn("-DCMAKE_CUDA_COMPILER=/usr/local/cuda-%s/bin/nvcc"
                      % self.args["CUDA_VERSION"], configure)
        self.assertIn("-DCMAKE_CUDA_ARCHITECTURES=%s" % self.args["CUDA_ARCHITECTURES"],
                      configure)
        self.assertIn("-DRETRACE_BUILD_TESTS=OFF", configure)
        self.assertEqual(configure[configure.index("-B") + 1], "/build")
        self.assertEqual(build[build.index("--target") + 1:],
                         ["retraced", "retrace", "retrace-batch"])

    def test_gpu_node_check_builds_the_same_way(self):
        """The bare-machine check runs build-node.sh too, or at least the
        same essentials: CUDA on, the toolkit's nvcc, a LibTorch given to
        CMake, and the three programs built."""
        path = os.path.join(SOURCE_DIR, "scripts", "gpu-node-check.sh")
        if not os.path.exists(path):
            self.skipTest("scripts/gpu-node-check.sh is not there yet")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if "scripts/build-node.sh" in text:
            return
        print("NOTE: scripts/gpu-node-check.sh configures and builds with its "
              "own cmake calls, not scripts/build-node.sh; checking that they "
              "agree with Dockerfile.gpu's on the essentials")
        self.assertIn("-DRETRACE_WITH_CUDA=ON", text)
        self.assertIn("-DCMAKE_CUDA_COMPILER=", text)
        self.assertRegex(text, r"-D(Torch_DIR|CMAKE_PREFIX_PATH)=")
        self.assertIn("torch.utils.cmake_prefix_path", text)
        for target in ("retraced", "retrace", "retrace-batch"):
            self.assertRegex(text, r"\b%s\b" % re.escape(target))

    def test_runtime_packages_leave_out_only_what_the_image_carries(self):
        runs = " ".join(self.build_runs)
        match = re.search(r"deploy/runtime-packages\.sh((?:\s+--provided\s+\S+)+)\s+/out/bin/\*",
                          runs)
        self.assertIsNotNone(match, "runtime-packages.sh call not found")
        provided = [p.strip('"') for p in match.group(1).split()[1::2]]
        self.assertEqual(provided, ["/opt/torch",
                                    "/usr/local/cuda-%s" % self.args["CUDA_VERSION"]])

    # --- runtime stage ---------------------------------------------------------

    def test_runs_as_a_numeric_non_root_user(self):
        users = self.final_values("USER")
        self.assertTrue(users, "the final stage sets no USER (it would be root)")
        user = users[-1].split(":")[0]
        self.assertRegex(user, r"^\d+$")
        self.assertNotEqual(int(user), 0)

    def test_same_interface_as_the_cpu_image(self):
        for keyword in ("USER", "HEALTHCHECK", "EXPOSE", "VOLUME", "STOPSIGNAL",
                        "ENTRYPOINT", "CMD", "WORKDIR"):
            self.assertEqual(self.final_values(keyword),
                             self.final_values(keyword, self.cpu_final), keyword)

    def test_healthcheck_uses_the_grpc_health_service(self):
        checks = self.final_values("HEALTHCHECK")
        self.assertEqual(len(checks), 1)
        argv = exec_form(checks[0].partition("CMD")[2].strip())
        self.assertEqual(argv, ["retrace", "health", "--server", "127.0.0.1:50051"])
        self.assertIn("--start-period", checks[0])

    def test_exposes_grpc_and_metrics(self):
        exposed = {int(p) for rest in self.final_values("EXPOSE") for p in rest.split()}
        self.assertEqual(exposed, {50051, 9464})

    def test_nvidia_container_toolkit_environment(self):
        env = " ".join(expand(rest, self.args) for rest in self.final_values("ENV"))
        self.assertIn("NVIDIA_VISIBLE_DEVICES=all", env)
        self.assertIn("NVIDIA_DRIVER_CAPABILITIES=compute,utility", env)
        self.assertIn('NVIDIA_REQUIRE_CUDA="cuda>=%s"' % self.args["CUDA_VERSION"], env)

    def test_runtime_carries_libtorch_and_checks_every_library(self):
        copies = [shlex.split(rest) for rest in self.final_values("COPY")]
        self.assertIn(["--from=build", "/out/torch/opt/torch", "/opt/torch"], copies)
        self.assertIn(["--from=build", "/out/bin/", "/usr/local/bin/"], copies)
        runs = " ".join(self.final_values("RUN"))
        self.assertIn("/etc/ld.so.conf.d/", runs)
        self.assertIn("ldconfig", runs)
        for name in ("retraced", "retrace", "retrace-batch"):
            self.assertIn("ldd", runs)
            self.assertRegex(runs, r"/usr/local/bin/%s\b" % re.escape(name))
        # Only the driver's libraries may be missing at build time.
        self.assertIn("grep -vx -e libcuda.so.1 -e libnvidia-ml.so.1", runs)

    def test_config_file_is_the_cpu_images(self):
        copies = [shlex.split(rest) for rest in self.final_values("COPY")]
        self.assertIn(["deploy/retraced.toml", "/etc/retrace/retraced.toml"], copies)

    def test_no_machine_paths(self):
        self.assertNotRegex(self.text, r"/(work|home|root)/")


class DockerIgnoreGpu(dockerfile_test.DockerIgnore):
    """.dockerignore against what Dockerfile.gpu copies."""

    def test_keeps_what_the_image_build_copies(self):
        sources = []
        for keyword, rest in instructions(read("Dockerfile.gpu")):
            if keyword == "COPY":
                words = shlex.split(rest)
                if any(w.startswith("--from") for w in words):
                    continue
                sources += [w for w in words[:-1] if not w.startswith("--")]
        self.assertIn(".", sources)
        for needed in [s for s in sources if s != "."] + [
                "scripts/build-node.sh", "deploy/runtime-packages.sh",
                "CMakeLists.txt", "Dockerfile.gpu"]:
            self.assertFalse(self.ignored(needed), needed)
            self.assertTrue(os.path.exists(os.path.join(SOURCE_DIR, needed)), needed)

    def test_excludes_what_travels_to_a_bare_gpu_machine(self):
        for path in ("third_party-gpu/googletest/CMakeLists.txt",
                     "third_party-node/debs/libgrpc++1.51_amd64.deb"):
            self.assertTrue(self.ignored(path), path)


if __name__ == "__main__":
    unittest.main(verbosity=2)
