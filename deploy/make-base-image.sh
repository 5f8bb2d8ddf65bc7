#!/usr/bin/env bash
# A local base image for hosts that cannot pull from a registry: a Debian bookworm root made
# by debootstrap and turned into an image by `docker import`. It carries what the Dockerfile
# expects of its base (python3 with venv, g++ for torch.compile, CA certificates), so
#
#   deploy/make-base-image.sh                      # -> rerank-base:bookworm
#   docker build --network host -f deploy/Dockerfile --build-arg BASE_IMAGE=rerank-base:bookworm ...
#
# (deploy/build-image.sh does both, and serves the build its Python packages on loopback).
# The Debian mirror is the one apt on this host uses (DEBIAN_MIRROR overrides it). An existing
# image of that tag is kept: delete it, or pass --rebuild, to make it again.
#
# Root (debootstrap needs it) and the debootstrap package: apt-get install debootstrap.
set -euo pipefail

TAG=${BASE_TAG:-rerank-base:bookworm}
SUITE=bookworm
PACKAGES=python3,python3-venv,g++,ca-certificates

apt_mirror() {
  # deb822 sources first (Debian 12's default), then the one-line format
  local uri
  uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n 1)
  [ -n "$uri" ] || uri=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    | awk '{print $2}' | grep -v security | head -n 1)
  echo "${uri:-http://deb.debian.org/debian}"
}

if [ "${1:-}" != "--rebuild" ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "base: $TAG exists (pass --rebuild to make it again)" >&2
  exit 0
fi

mirror=${DEBIAN_MIRROR:-$(apt_mirror)}
root=$(mktemp -d /tmp/rerank-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base: debootstrap $SUITE from $mirror" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$mirror" >/dev/null
# an image needs no package lists or caches; apt inside a build fetches its own
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  - "$TAG" >/dev/null
echo "base: $TAG ($(docker image inspect -f '{{.Size}}' "$TAG") bytes)" >&2
