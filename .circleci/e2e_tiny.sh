#!/bin/bash
# End-to-end run of the container on the tiny synthetic dataset, as CI does it:
#   .circleci/e2e_tiny.sh IMAGE [WORKSPACE]
# Generates the dataset inside the image, runs participant -> group (--train-preset quick)
# -> participant --model with no network, a read-only root filesystem and the data mounted
# read-only, checks the data did not change, and compares the outputs with
# .circleci/expected_outputs_tiny.txt.  Needs a Docker engine.
set -euo pipefail

IMAGE=${1:?usage: e2e_tiny.sh IMAGE [WORKSPACE]}
WS=${2:-/tmp/bids_uad_e2e}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DATA=$WS/data OUT=$WS/out WORK=$WS/work
rm -rf "$DATA" "$OUT" "$WORK"
mkdir -p "$DATA" "$OUT" "$WORK"

USER_OPT=(--user "$(id -u):$(id -g)")
HARDENED=(--rm --network none --read-only --tmpfs /tmp "${USER_OPT[@]}" --security-opt no-new-privileges)
MOUNTS=(-v "$DATA:/data:ro" -v "$OUT:/out" -v "$WORK:/work")

echo "--- synthetic dataset"
docker run --rm --network none "${USER_OPT[@]}" -e HOME=/tmp -v "$DATA:/data" --entrypoint bids_uad-synth \
    "$IMAGE" /data --preset tiny --seed 0
checksums() { (cd "$DATA" && find . -type f -exec sha256sum {} + | sort -k2); }
checksums > "$WS/data.sha256"

echo "--- participant"
docker run "${HARDENED[@]}" "${MOUNTS[@]}" "$IMAGE" /data /out participant -w /work --nprocs 2 --seed 0
echo "--- group"
docker run "${HARDENED[@]}" "${MOUNTS[@]}" "$IMAGE" /data /out group -w /work --train-preset quick --nprocs 2 --seed 0
echo "--- participant --model"
docker run "${HARDENED[@]}" "${MOUNTS[@]}" "$IMAGE" /data /out participant -w /work --model /out/models --nprocs 2 --seed 0

echo "--- checks"
checksums | diff -u "$WS/data.sha256" - || { echo "the input dataset changed" >&2; exit 1; }
python3 "$HERE/compare_outputs.py" "$OUT" --list > "$WS/outputs.txt"
python3 "$HERE/compare_outputs.py" "$OUT" "$HERE/expected_outputs_tiny.txt"
