#!/bin/bash
# Submit a whole bids_uad study to SLURM: the participant array (one task per row of
# participants.tsv), then the group level once every task succeeded (afterok), and with
# --inference a second participant array that maps anomalies with the trained models.
#
#   workflows/submit.sh [--inference] [--max-parallel N] BIDS_DIR OUTPUT_DIR WORK_DIR [-- SBATCH_OPTIONS...]
#
# Environment passed on to the jobs: SIF (default ./bids_uad.sif), BIDS_UAD_ARGS,
# BIDS_UAD_GROUP_ARGS, TEMPLATEFLOW_HOST, APPTAINER, APPTAINER_RUN_OPTS (see the .sbatch files).
# Prints the job ids, one "name<TAB>id" per line.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 64; }

RECIPES=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=workflows/slurm_lib.sh
source "${RECIPES}/slurm_lib.sh"
SBATCH=${SBATCH:-sbatch}

INFERENCE=0
MAX_PARALLEL=${MAX_PARALLEL:-}
while [ $# -gt 0 ]; do
    case $1 in
        --inference) INFERENCE=1; shift ;;
        --max-parallel) MAX_PARALLEL=${2:?--max-parallel needs a number}; shift 2 ;;
        -h|--help) usage ;;
        --) break ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -ge 3 ] || usage
BIDS_DIR=$(cd "$1" && pwd) || exit 66
mkdir -p "$2" "$3" || exit 73
OUTPUT_DIR=$(cd "$2" && pwd)
WORK_DIR=$(cd "$3" && pwd)
shift 3
if [ "${1:-}" = "--" ]; then shift; fi
SBATCH_OPTIONS=("$@")
SIF=$(realpath "${SIF:-bids_uad.sif}")
[ -r "$SIF" ] || { echo "Apptainer image not found: $SIF (set SIF)" >&2; exit 66; }

N=$(participant_count "${BIDS_DIR}/participants.tsv")
if (( N < 1 )); then
    echo "no participants in ${BIDS_DIR}/participants.tsv" >&2
    exit 18
fi
ARRAY="1-${N}${MAX_PARALLEL:+%${MAX_PARALLEL}}"
export BIDS_DIR OUTPUT_DIR WORK_DIR SIF
export BIDS_UAD_RECIPES=$RECIPES

# --parsable prints "jobid" or "jobid;cluster"
job_id() { local out; out=$("$SBATCH" --parsable "$@"); echo "${out%%;*}"; }

PARTICIPANT=$(job_id --array="$ARRAY" "${SBATCH_OPTIONS[@]}" "${RECIPES}/slurm_participant.sbatch")
printf 'participant\t%s\n' "$PARTICIPANT"
GROUP=$(PARTICIPANT_JOB_ID=$PARTICIPANT job_id --dependency="afterok:${PARTICIPANT}" --kill-on-invalid-dep=yes \
        --export=ALL,PARTICIPANT_JOB_ID="$PARTICIPANT" "${SBATCH_OPTIONS[@]}" "${RECIPES}/slurm_group.sbatch")
printf 'group\t%s\n' "$GROUP"
if (( INFERENCE )); then
    INFER=$(BIDS_UAD_ARGS="--model /out/models ${BIDS_UAD_ARGS:-}" job_id --array="$ARRAY" \
            --dependency="afterok:${GROUP}" --kill-on-invalid-dep=yes --job-name=bids_uad-inference \
            --export=ALL,BIDS_UAD_ARGS="--model /out/models ${BIDS_UAD_ARGS:-}" \
            "${SBATCH_OPTIONS[@]}" "${RECIPES}/slurm_participant.sbatch")
    printf 'inference\t%s\n' "$INFER"
fi
