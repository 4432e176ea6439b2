#!/bin/bash
# End-to-end run on the tiny synthetic dataset, as CI does it:
#   .circleci/e2e_tiny.sh IMAGE [WORKSPACE]            # the container (needs a Docker engine)
#   .circleci/e2e_tiny.sh local [WORKSPACE]            # the bids_uad installed on this machine
#   .circleci/e2e_tiny.sh IMAGE|local [WORKSPACE] --record  # ... and record the expected file list
# Generates the dataset, runs participant -> group (--train-preset quick, evaluated against the
# synthetic truth) -> participant --model.  With an image: no network, a read-only root
# filesystem (--tmpfs /tmp), a non-root user (the caller's uid, or E2E_UID, default 1234, when
# the caller is root) and the data mounted read-only; locally: the data folder made read-only.
# Checks the data did not change, and compares the outputs with .circleci/expected_outputs_tiny.txt.
# The wall time of each step goes to WORKSPACE/timing.tsv.
# Recording writes the template space as MNI152NLin2009* (the image bakes in TemplateFlow's
# MNI152NLin2009cAsym; a checkout without TemplateFlow uses nilearn's MNI152NLin2009aSym).
set -euo pipefail

IMAGE=${1:?usage: e2e_tiny.sh IMAGE|local [WORKSPACE] [--record]}
WS=${2:-/tmp/bids_uad_e2e}
RECORD=${3:-}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
EXPECTED=$HERE/expected_outputs_tiny.txt
DATA=$WS/data OUT=$WS/out WORK=$WS/work
[ -d "$DATA" ] && chmod -R u+w "$DATA"
rm -rf "$DATA" "$OUT" "$WORK"
mkdir -p "$DATA" "$OUT" "$WORK"
DOCKER=${DOCKER:-docker}

if [ "$IMAGE" = local ]; then
    synth() { bids_uad-synth "$DATA" "$@"; }
    bids_uad_run() { bids_uad "$DATA" "$OUT" "$@"; }
    D=$DATA O=$OUT W=$WORK
else
    RUN_UID=$(id -u) RUN_GID=$(id -g)
    if [ "$RUN_UID" = 0 ]; then  # never run the image as root: a fixed non-root uid owns the folders
        RUN_UID=${E2E_UID:-1234} RUN_GID=${E2E_UID:-1234}
        chown "$RUN_UID:$RUN_GID" "$DATA" "$OUT" "$WORK"
    fi
    USER_OPT=(--user "$RUN_UID:$RUN_GID")
    HARDENED=(--rm --network none --read-only --tmpfs /tmp "${USER_OPT[@]}" --security-opt no-new-privileges)
    MOUNTS=(-v "$DATA:/data:ro" -v "$OUT:/out" -v "$WORK:/work")
    synth() {
        "$DOCKER" run "${HARDENED[@]}" -e HOME=/tmp -v "$DATA:/data" --entrypoint bids_uad-synth \
            "$IMAGE" /data "$@"
    }
    bids_uad_run() { "$DOCKER" run "${HARDENED[@]}" "${MOUNTS[@]}" "$IMAGE" /data /out "$@"; }
    D=/data O=/out W=/work
fi
COMMON=(-w "$W" --nprocs 2 --seed 0 --lesion-masks "$D/derivatives/synthetic-truth")

TIMING=$WS/timing.tsv
printf 'step\tseconds\n' > "$TIMING"
timed() {  # timed STEP COMMAND...: run it and record its wall time
    local step=$1 start=$SECONDS
    shift
    echo "--- $step"
    "$@"
    printf '%s\t%s\n' "$step" $((SECONDS - start)) >> "$TIMING"
}

timed synthetic-dataset synth --preset tiny --seed 0
checksums() { (cd "$DATA" && find . -type f -exec sha256sum {} + | sort -k2); }
checksums > "$WS/data.sha256"
[ "$IMAGE" = local ] && chmod -R a-w "$DATA"

timed participant bids_uad_run participant "${COMMON[@]}"
# the models expected_outputs_tiny.txt was recorded with (the default list also has the cdae)
timed group bids_uad_run group "${COMMON[@]}" --train-preset quick --models dae recdisc normative meansignal
timed participant-model bids_uad_run participant "${COMMON[@]}" --model "$O/models"
awk -F '\t' 'NR > 1 { s += $2 } END { printf "total\t%d\n", s }' "$TIMING" >> "$TIMING"

echo "--- checks"
checksums | diff -u "$WS/data.sha256" - || { echo "the input dataset changed" >&2; exit 1; }
python3 "$HERE/compare_outputs.py" "$OUT" --list > "$WS/outputs.txt"
if [ "$RECORD" = --record ]; then
    {
        echo "# Files of the tiny end-to-end run (.circleci/e2e_tiny.sh), recorded with"
        echo "#   .circleci/e2e_tiny.sh $([ "$IMAGE" = local ] && echo local || echo IMAGE) WORKSPACE --record"
        echo "# Template space written as MNI152NLin2009* (TemplateFlow's cAsym in the image, nilearn's aSym"
        echo "# elsewhere). Run identifiers are normalized to *. The per-finding report figures are one"
        echo "# glob: their number depends on the data and the trained models."
        sed -E 's/MNI152NLin2009aSym/MNI152NLin2009*/g; s/MNI152NLin2009cAsym/MNI152NLin2009*/g
                s#^sub-[^/]+/figures/.*_desc-finding[0-9]+_anomaly\.svg$#sub-*/figures/*_desc-finding*_anomaly.svg#' \
            "$WS/outputs.txt" | sort -u
    } > "$EXPECTED"
    echo "recorded $(grep -vc '^#' "$EXPECTED") patterns in $EXPECTED"
fi
python3 "$HERE/compare_outputs.py" "$OUT" "$EXPECTED"
