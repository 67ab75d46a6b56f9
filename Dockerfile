# strata container images, one Dockerfile, four targets (deploy/README.md):
#
#   docker build -t strata:latest .                       # runtime (the last stage)
#   docker build -t strata:rdma --target rdma .           # + hardware verbs
#   docker build -t strata:gpu --target gpu .             # CUDA runtime base
#   docker build -t strata:gpu-rdma --target gpu-rdma .   # both
#
# Every image runs `strata` as the non-root user strata (uid/gid 10001) under
# tini, which as PID 1 forwards signals and reaps zombies: SIGTERM (docker
# stop, pod deletion) stops the JobManager, and a TaskManager cancels its
# tasks and removes its spill files first.
#
# BuildKit (the default builder since Docker 23; DOCKER_BUILDKIT=1 on 20.10)
# builds only the stages a target needs, so the default image never installs
# the RDMA headers. Its built-in Dockerfile frontend reads the cache and bind
# mounts below, so there is no `# syntax=` line: the build needs no image
# besides the two bases, and works against a private or offline registry.

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
# The GPU images run the same binary: strata loads libcuda and NVRTC with
# dlopen, so nothing CUDA is needed to build it. The runtime flavour carries
# NVRTC (kernels are compiled at run time); libcuda comes from the node's
# driver through the NVIDIA container toolkit. cudarc is built against the
# 12.8 API (Cargo.toml: cuda-12080), so the driver must support CUDA 12.8.
# Ubuntu 24.04's glibc (2.39) is newer than bookworm's (2.36), which the
# binary is linked against.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------- builders

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The registry and target caches survive between builds; the binary is
# copied out of the cache mount so the next stage can see it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=strata-target \
    cargo build --release --locked \
    && install -m 0755 target/release/strata /usr/local/bin/strata

FROM ${RUST_IMAGE} AS build-rdma
WORKDIR /src
COPY scripts/install_rdma_deps.sh scripts/install_rdma_deps.sh
# libibverbs-dev, librdmacm-dev, libclang (bindgen) and pkg-config.
RUN scripts/install_rdma_deps.sh && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=strata-target-rdma \
    cargo build --release --locked --features rdma \
    && install -m 0755 target/release/strata /usr/local/bin/strata

# ---------------------------------------------------------------- runtimes

FROM ${RUNTIME_IMAGE} AS runtime-rdma-base
RUN --mount=type=bind,source=deploy/docker/setup-runtime.sh,target=/tmp/setup-runtime.sh \
    sh /tmp/setup-runtime.sh libibverbs1 librdmacm1 ibverbs-providers

FROM runtime-rdma-base AS rdma
COPY --from=build-rdma /usr/local/bin/strata /usr/local/bin/strata
USER 10001:10001
WORKDIR /var/lib/strata
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/strata"]
CMD ["--help"]

FROM ${CUDA_IMAGE} AS gpu
RUN --mount=type=bind,source=deploy/docker/setup-runtime.sh,target=/tmp/setup-runtime.sh \
    sh /tmp/setup-runtime.sh
# Compiled kernels are cached here (a volume in deploy/kubernetes/overlays/gpu).
ENV STRATA_KERNEL_CACHE=/var/lib/strata/cache/kernels \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=build /usr/local/bin/strata /usr/local/bin/strata
USER 10001:10001
WORKDIR /var/lib/strata
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/strata"]
CMD ["--help"]

FROM ${CUDA_IMAGE} AS gpu-rdma
RUN --mount=type=bind,source=deploy/docker/setup-runtime.sh,target=/tmp/setup-runtime.sh \
    sh /tmp/setup-runtime.sh libibverbs1 librdmacm1 ibverbs-providers
ENV STRATA_KERNEL_CACHE=/var/lib/strata/cache/kernels \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=build-rdma /usr/local/bin/strata /usr/local/bin/strata
USER 10001:10001
WORKDIR /var/lib/strata
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/strata"]
CMD ["--help"]

# The default target: the default build on Debian slim.
FROM ${RUNTIME_IMAGE} AS runtime
RUN --mount=type=bind,source=deploy/docker/setup-runtime.sh,target=/tmp/setup-runtime.sh \
    sh /tmp/setup-runtime.sh
COPY --from=build /usr/local/bin/strata /usr/local/bin/strata
USER 10001:10001
WORKDIR /var/lib/strata
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/strata"]
CMD ["--help"]
