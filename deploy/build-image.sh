#!/usr/bin/env bash
# Build the serving image on a host without registry or package-index access, from the same
# deploy/Dockerfile a normal host uses (there: `docker build -f deploy/Dockerfile .`).
#
#   deploy/build-image.sh [TAG]        # default qwen3-rerank:cpu
#
# 1. the base: deploy/make-base-image.sh (debootstrap + docker import), kept once made;
# 2. the Python packages: `pip download` by this host's own pip, so whatever index, mirror or
#    local wheel directory its configuration names (torch included) is where they come from,
#    into a wheelhouse kept between builds (RERANK_WHEELHOUSE);
# 3. the build, on the host network, with pip pointed at that wheelhouse served on loopback.
# The classic builder: BuildKit would fetch the `# syntax` frontend image from a registry.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${1:-qwen3-rerank:cpu}
BASE=${BASE_TAG:-rerank-base:bookworm}
WHEELS=${RERANK_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/rerank-deploy/wheels}
PYTHON=${PYTHON:-python3}

BASE_TAG=$BASE deploy/make-base-image.sh
base_py=$(docker run --rm --network host "$BASE" python3 -c 'import sys; print(sys.version_info[:2])')
host_py=$("$PYTHON" -c 'import sys; print(sys.version_info[:2])')
if [ "$base_py" != "$host_py" ]; then
  echo "build: $PYTHON is $host_py but the base has $base_py: the wheels would not fit" >&2
  exit 1
fi

mkdir -p "$WHEELS"
echo "build: wheels into $WHEELS" >&2
"$PYTHON" -m pip download -q --disable-pip-version-check -d "$WHEELS" '.[serve]' setuptools wheel
rm -f "$WHEELS"/qwen3*rerank*  # the project itself comes from the build context

# A fixed port: the URL is a build argument, and the classic builder's layer cache keys on it,
# so a new port each time would reinstall torch on every build.
port=${RERANK_WHEELHOUSE_PORT:-47613}
if ! "$PYTHON" -c "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', $port))" 2>/dev/null; then
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  echo "build: port ${RERANK_WHEELHOUSE_PORT:-47613} is taken, serving wheels on $port: no layer cache this time" >&2
fi
"$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$port" >/dev/null 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT

DOCKER_BUILDKIT=0 docker build --network host -f deploy/Dockerfile -t "$TAG" \
  --build-arg BASE_IMAGE="$BASE" \
  --build-arg PIP_NO_INDEX=1 \
  --build-arg PIP_FIND_LINKS="http://127.0.0.1:$port/" \
  .
echo "build: $TAG ($(docker image inspect -f '{{.Size}}' "$TAG") bytes)" >&2
