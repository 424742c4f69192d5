# retraced, the retrace attribution server, for one NVIDIA GPU node
# (docs/operations.md, "Docker"). Two stages, both Debian 12 (bookworm):
#
#   build    Debian's build dependencies (scripts/setup.sh, the list every
#            build of the project uses) plus nvcc from NVIDIA's CUDA
#            repository for Debian 12; builds retraced, retrace (the CLI, used
#            by HEALTHCHECK) and retrace-batch with the CUDA kernels.
#   runtime  debian:bookworm-slim with exactly the Debian packages that
#            provide the libraries those binaries link (LibTorch, gRPC,
#            protobuf, abseil, ...; listed by deploy/runtime-packages.sh in
#            the build stage), so both stages share one ABI. No CUDA package
#            is needed at run time: the CUDA runtime is linked statically and
#            the NVIDIA Container Toolkit mounts the driver into the container.
#
#   docker build -t retrace:latest .
#   docker run --gpus 1 -p 50051:50051 -p 9464:9464 \
#       -v /srv/retrace/store:/var/lib/retrace/store:ro \
#       -v /srv/retrace/run:/var/lib/retrace/run:ro \
#       retrace:latest --run /var/lib/retrace/run
#
# Arguments after the image name are retraced flags; they override
# /etc/retrace/retraced.toml (deploy/retraced.toml).

ARG DEBIAN_RELEASE=bookworm

FROM debian:${DEBIAN_RELEASE} AS build
# CUDA toolkit from NVIDIA's Debian 12 repository (12.x supports Debian 12's
# GCC 12). The kernels need only nvcc and the static CUDA runtime.
ARG CUDA_VERSION=12.4
# Machine code for sm_80 (A100; runs on sm_86/sm_89 too) and sm_90 (H100),
# plus compute_90 PTX: the project's default.
ARG CUDA_ARCHITECTURES="80-real;90"
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

COPY scripts/setup.sh /src/scripts/setup.sh
RUN bash /src/scripts/setup.sh \
 && apt-get install -y -qq --no-install-recommends curl \
 && curl -fsSL -o /tmp/cuda-keyring.deb \
      https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb \
 && dpkg -i /tmp/cuda-keyring.deb \
 && rm /tmp/cuda-keyring.deb \
 && apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends \
      "cuda-nvcc-${CUDA_VERSION/./-}" "cuda-cudart-dev-${CUDA_VERSION/./-}" \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DRETRACE_WITH_CUDA=ON \
      -DCMAKE_CUDA_COMPILER="/usr/local/cuda-${CUDA_VERSION}/bin/nvcc" \
      -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES}" \
      -DRETRACE_BUILD_TESTS=OFF -DRETRACE_BUILD_BENCH=OFF \
 && cmake --build /build --target retraced retrace retrace-batch \
 && mkdir -p /out/bin \
 && for name in retraced retrace retrace-batch; do \
      found=$(find /build -type f -name "$name" -perm -u+x); \
      if [ "$(printf '%s\n' "$found" | grep -c .)" != 1 ]; then \
        echo "expected one built '$name', found: ${found:-none}" >&2; exit 1; \
      fi; \
      install -m 755 "$found" /out/bin/; \
    done \
 && bash deploy/runtime-packages.sh /out/bin/* > /out/runtime-packages.txt \
 && cat /out/runtime-packages.txt

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# The runtime libraries, and Fashion-MNIST for thumbnails of stores built from
# it (retraced reads /usr/share/datasets/fashion-mnist by default).
COPY --from=build /out/runtime-packages.txt /tmp/runtime-packages.txt
RUN apt-get update -qq \
 && xargs -a /tmp/runtime-packages.txt apt-get install -y -qq --no-install-recommends \
      dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt

# A fixed non-root user (uid/gid 10001), so that mounted secrets and volumes
# can be made readable to it by number.
RUN groupadd --system --gid 10001 retrace \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/retrace \
      --no-create-home --shell /usr/sbin/nologin retrace \
 && mkdir -p /var/lib/retrace/store /var/lib/retrace/run \
      /var/lib/retrace/data/mnist /etc/retrace \
 && chown -R 10001:10001 /var/lib/retrace

COPY --from=build /out/bin/ /usr/local/bin/
COPY deploy/retraced.toml /etc/retrace/retraced.toml

# NVIDIA Container Toolkit: expose the GPUs given to the container and mount
# the driver's compute libraries. LibTorch's OpenMP workers sleep instead of
# spinning when idle (they share the cores with the gRPC threads).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    OMP_WAIT_POLICY=PASSIVE

USER 10001:10001
WORKDIR /var/lib/retrace
VOLUME ["/var/lib/retrace/store"]
# gRPC (retrace.v1.Attribution, grpc.health.v1.Health, reflection) and the
# Prometheus /metrics endpoint.
EXPOSE 50051 9464
# retraced drains on SIGTERM for --drain-timeout-s (30 s by default): give
# `docker stop` a longer --time (compose: stop_grace_period).
STOPSIGNAL SIGTERM
# Healthy once the store is loaded (health SERVING); NOT_SERVING while loading
# and draining. The start period covers loading a large store.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
  CMD ["retrace", "health", "--server", "127.0.0.1:50051"]
ENTRYPOINT ["retraced", "--config", "/etc/retrace/retraced.toml"]
CMD []
