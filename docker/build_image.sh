#!/bin/bash
# Build the bids_uad image: `make image` runs this.
#
#   docker/build_image.sh [IMAGE]        # default bids_uad (tagged :<version> and :latest)
#
# Official bases and servers by default (python:3.11-slim-bookworm, the PyTorch CPU index,
# TemplateFlow, FSL's conda channel).  On a machine prepared by shared/tools/docker-engine.sh
# (no Docker Hub, no download.pytorch.org, no TemplateFlow, no FSL channel) its stand-ins are
# used instead: local/python:3.11-slim-bookworm for the runtime, local/python-build:... (which
# trusts the machine's CA certificates) for the build, the local torch wheels at
# http://127.0.0.1:8765/, WITH_TEMPLATEFLOW=false and WITH_FSL=false.
# Environment: DOCKER (the client; default /usr/bin/docker when present, BuildKit needed),
# STANDINS=auto|yes|no, WITH_FSL, WITH_TEMPLATEFLOW, RUNTIME_IMAGE, BUILD_IMAGE, TORCH_PIP_ARGS,
# BUILD_CA_CERTS (PEM text), DOCKER_BUILD_OPTS (more `docker build` options).
# Prints the build time and the image size at the end.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${1:-bids_uad}
if [ -z "${DOCKER:-}" ]; then
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
export DOCKER_BUILDKIT=1
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$REPO/bids_uad/__init__.py")
[ -n "$VERSION" ] || { echo "build_image.sh: no __version__ in bids_uad/__init__.py" >&2; exit 65; }
"$DOCKER" info >/dev/null 2>&1 || { echo "build_image.sh: no Docker engine answers ($DOCKER info failed)" >&2; exit 69; }

STANDIN_RUNTIME=local/python:3.11-slim-bookworm
STANDIN_BUILD=local/python-build:3.11-slim-bookworm
STANDIN_WHEELS=http://127.0.0.1:8765/
standins_present() {
    "$DOCKER" image inspect "$STANDIN_RUNTIME" "$STANDIN_BUILD" >/dev/null 2>&1 \
        && python3 -c "import urllib.request; urllib.request.urlopen('$STANDIN_WHEELS', timeout=5)" 2>/dev/null
}
case ${STANDINS:-auto} in
    yes) USE_STANDINS=1 ;;
    no) USE_STANDINS=0 ;;
    auto) if standins_present; then USE_STANDINS=1; else USE_STANDINS=0; fi ;;
    *) echo "build_image.sh: STANDINS must be auto, yes or no" >&2; exit 64 ;;
esac

ARGS=(--build-arg "VERSION=$VERSION")
OPTS=()
if (( USE_STANDINS )); then
    echo "build_image.sh: using docker-engine.sh's stand-ins ($STANDIN_RUNTIME, $STANDIN_BUILD, torch from $STANDIN_WHEELS)"
    : "${RUNTIME_IMAGE:=$STANDIN_RUNTIME}" "${BUILD_IMAGE:=$STANDIN_BUILD}"
    : "${TORCH_PIP_ARGS:=--find-links $STANDIN_WHEELS}"
    : "${WITH_TEMPLATEFLOW:=false}" "${WITH_FSL:=false}"
    OPTS+=(--network host)  # the wheel server listens on the host's loopback
fi
for name in RUNTIME_IMAGE BUILD_IMAGE TORCH_PIP_ARGS WITH_TEMPLATEFLOW WITH_FSL BUILD_CA_CERTS; do
    if [ -n "${!name:-}" ]; then ARGS+=(--build-arg "$name=${!name}"); fi
done
read -r -a EXTRA <<< "${DOCKER_BUILD_OPTS:-}"

START=$(date +%s)
"$DOCKER" build --progress=plain "${OPTS[@]}" "${ARGS[@]}" "${EXTRA[@]}" \
    -t "$IMAGE:$VERSION" -t "$IMAGE:latest" "$REPO"
END=$(date +%s)
SIZE=$("$DOCKER" image inspect --format '{{.Size}}' "$IMAGE:latest")
LABELS=$("$DOCKER" image inspect --format 'with-fsl={{index .Config.Labels "bids_uad.with-fsl"}} with-templateflow={{index .Config.Labels "bids_uad.with-templateflow"}}' "$IMAGE:latest")
awk -v s=$((END - START)) -v b="$SIZE" -v i="$IMAGE:$VERSION" -v l="$LABELS" \
    'BEGIN { printf "built %s (%s) in %d min %02d s; image size %.2f GB\n", i, l, s / 60, s % 60, b / 1e9 }'
