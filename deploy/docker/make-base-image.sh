#!/usr/bin/env bash
# A Debian bookworm base image (Python 3.11) built locally, for hosts that reach no image registry:
#   bash deploy/docker/make-base-image.sh            -> image disagg-base:bookworm
#   docker build --build-arg BASE_IMAGE=disagg-base:bookworm -t disagg:latest .
# Needs root, debootstrap (apt-get install debootstrap) and a Debian mirror (the apt sources of this host).
# Idempotent: does nothing when the tag already exists (FORCE=1 rebuilds).
set -euo pipefail
TAG=${BASE_TAG:-disagg-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if [ -z "${FORCE:-}" ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG exists"; exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
ROOTFS=$(mktemp -d /tmp/disagg-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" "$MIRROR"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  -c 'CMD ["/bin/bash"]' - "$TAG"
echo "built $TAG"
