#!/bin/sh
# Shared by every runtime stage of the Dockerfile (Debian and the CUDA
# images' Ubuntu): installs tini plus the packages given as arguments, and
# creates the strata user (uid/gid 10001, no shell, no password) and the
# directories the Kubernetes manifests and the systemd example use:
#   /etc/strata                  configuration (mounted read-only)
#   /var/lib/strata/spill        io.tmp.dirs
#   /var/lib/strata/checkpoints  execution.checkpointing.dir (shared storage)
#   /var/lib/strata/cache        the GPU kernel cache
# A numeric uid lets Kubernetes check runAsNonRoot against the image.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends tini "$@" >/dev/null
rm -rf /var/lib/apt/lists/*
groupadd --system --gid 10001 strata
useradd --system --uid 10001 --gid strata --home-dir /var/lib/strata \
  --no-create-home --shell /usr/sbin/nologin strata
install -d -m 0755 /etc/strata
install -d -m 0750 -o strata -g strata /var/lib/strata \
  /var/lib/strata/spill /var/lib/strata/checkpoints /var/lib/strata/cache
