#!/bin/bash
# `make image-test`: the tiny study through the image, checked against a run of the venv.
#
#   docker/test_image.sh IMAGE [WORKSPACE]       # default WORKSPACE /tmp/bids_uad_image_test
#
# 1. .circleci/e2e_tiny.sh IMAGE WORKSPACE/image: the synthetic tiny study, participant -> group
#    (--train-preset quick) -> participant --model inside the image with --network none
#    --read-only --tmpfs /tmp as a non-root user, the data mounted read-only; its file list
#    compared with .circleci/expected_outputs_tiny.txt.
# 2. .circleci/e2e_tiny.sh local WORKSPACE/venv: the same with the bids_uad of this checkout's
#    virtualenv (.venv/bin, or the one already on PATH).
# 3. .circleci/compare_runs.py: the same files, and the images equal within tolerance.
# Steps 1 and 2 run one after the other (PARALLEL=1: at the same time, each logging to
# WORKSPACE/{image,venv}.log); step 3 runs whatever failed before, and the script exits 1 when
# any step failed.
# Environment: DOCKER (default /usr/bin/docker when present), E2E_UID (uid used when run as
# root), RECORD=1 (record expected_outputs_tiny.txt from the image's run), PARALLEL=1.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${1:?usage: test_image.sh IMAGE [WORKSPACE]}
WS=${2:-/tmp/bids_uad_image_test}
if [ -z "${DOCKER:-}" ]; then
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
export DOCKER
"$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1 || { echo "test_image.sh: no image $IMAGE (make image)" >&2; exit 66; }
if [ -x "$REPO/.venv/bin/bids_uad" ]; then PATH=$REPO/.venv/bin:$PATH; fi
command -v bids_uad >/dev/null || { echo "test_image.sh: no bids_uad on PATH for the venv run (make install)" >&2; exit 69; }
PYTHON=$(dirname "$(command -v bids_uad)")/python
mkdir -p "$WS"

FAILED=()
run_image() { "$REPO/.circleci/e2e_tiny.sh" "$IMAGE" "$WS/image" ${RECORD:+--record}; }
run_venv() { "$REPO/.circleci/e2e_tiny.sh" local "$WS/venv"; }
if [ "${PARALLEL:-0}" = 1 ]; then
    echo "=== the image ($IMAGE) and the venv ($(command -v bids_uad)) at the same time: $WS/{image,venv}.log"
    run_image > "$WS/image.log" 2>&1 & IMAGE_PID=$!
    run_venv > "$WS/venv.log" 2>&1 & VENV_PID=$!
    for run in image venv; do
        pid_var=${run^^}_PID
        if wait "${!pid_var}"; then code=0; else code=$?; fi
        echo "=== $run (exit $code): the end of $WS/$run.log"
        tail -n 25 "$WS/$run.log"
        (( code == 0 )) || FAILED+=("$run run")
    done
else
    echo "=== the image: $IMAGE"
    run_image || FAILED+=("image run")
    echo "=== the venv: $(command -v bids_uad)"
    run_venv || FAILED+=("venv run")
fi
echo "=== image against venv"
"$PYTHON" "$REPO/.circleci/compare_runs.py" "$WS/image/out" "$WS/venv/out" --report "$WS/compare_runs.tsv" \
    || FAILED+=("image against venv")
if [ -f "$WS/image/timing.tsv" ] && [ -f "$WS/venv/timing.tsv" ]; then
    echo "wall times (s), image | venv:"
    paste "$WS/image/timing.tsv" "$WS/venv/timing.tsv" | awk -F '\t' 'NR > 1 { printf "  %-18s %6s | %6s\n", $1, $2, $4 }'
fi
if (( ${#FAILED[@]} )); then
    echo "test_image.sh: failed: ${FAILED[*]}" >&2
    exit 1
fi
echo "test_image.sh: the image passed (files as expected, outputs equal to the venv's)"
