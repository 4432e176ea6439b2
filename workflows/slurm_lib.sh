# shellcheck shell=bash
# Helpers shared by the SLURM recipes (sourced, never run).  Pure bash + coreutils/awk so
# they can be tested without SLURM: tests/containers/test_batch_recipes.py.

# participant_count TSV
#   Number of participants listed in a BIDS participants.tsv (header, blank lines and
#   '#' comments skipped).  Array jobs use --array=1-<count>.
participant_count() {
    local tsv=$1 labels
    labels=$(participant_list "$tsv") || return $?
    printf '%s\n' "$labels" | awk 'NF { n++ } END { print n + 0 }'
}

# participant_list TSV
#   The participant labels (without 'sub-'), one per line, in file order; the column is
#   found by its header name participant_id (any position), CRLF line ends tolerated.
participant_list() {
    local tsv=$1
    [ -r "$tsv" ] || { echo "participants file not readable: $tsv" >&2; return 66; }
    awk -F '\t' '
        { sub(/\r$/, "") }
        NR == 1 {
            for (i = 1; i <= NF; i++) if ($i == "participant_id") col = i
            if (!col) { print "no participant_id column in the header" > "/dev/stderr"; exit 65 }
            next
        }
        /^[[:space:]]*$/ || /^#/ { next }
        {
            label = $col
            gsub(/^[[:space:]]+|[[:space:]]+$/, "", label)
            sub(/^sub-/, "", label)
            if (label !~ /^[A-Za-z0-9]+$/) { printf "invalid participant label %s\n", $col > "/dev/stderr"; exit 65 }
            print label
        }' "$tsv"
}

# participant_for_task TSV [INDEX]
#   The label of array task INDEX (default $SLURM_ARRAY_TASK_ID; 1-based: task 1 is the
#   first data row).  Returns 64 when INDEX is missing or not a number, 65 when out of range.
participant_for_task() {
    local tsv=$1 index=${2:-${SLURM_ARRAY_TASK_ID:-}} labels count
    if ! [[ $index =~ ^[0-9]+$ ]]; then
        echo "array task index missing or not a number: '${index}' (run as an array job)" >&2
        return 64
    fi
    labels=$(participant_list "$tsv") || return $?
    count=$(printf '%s\n' "$labels" | awk 'NF { n++ } END { print n + 0 }')
    if (( index < 1 || index > count )); then
        echo "array task ${index} out of range: ${tsv} lists ${count} participant(s)" >&2
        return 65
    fi
    printf '%s\n' "$labels" | sed -n "${index}p"
}

# record_task_status DIR JOB TASK PARTICIPANT EXIT_CODE START END
#   Write one TSV line for this task to DIR/job-<JOB>_task-<TASK>.tsv atomically (temporary
#   file in the same folder, then rename): tasks on many nodes never interleave writes, and
#   a reader never sees half a line.  Columns: see STATUS_COLUMNS.
STATUS_COLUMNS="job_id	task_id	participant_id	exit_code	start	end	host"
record_task_status() {
    local dir=$1 job=$2 task=$3 participant=$4 code=$5 start=$6 end=$7 tmp
    mkdir -p "$dir" || return 73
    tmp=$(mktemp "${dir}/.job-${job}_task-${task}.XXXXXX") || return 73
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$job" "$task" "sub-${participant}" "$code" "$start" "$end" \
        "$(hostname 2>/dev/null || echo n/a)" > "$tmp" || { rm -f "$tmp"; return 73; }
    chmod 0644 "$tmp"
    mv -f "$tmp" "${dir}/job-${job}_task-${task}.tsv"
}

# summarize_task_status DIR JOB
#   Gather the per-task lines of array job JOB into DIR/job-<JOB>_summary.tsv (header +
#   one line per task, sorted by task), atomically; prints the number of failed tasks.
summarize_task_status() {
    local dir=$1 job=$2 tmp failed
    tmp=$(mktemp "${dir}/.job-${job}_summary.XXXXXX") || return 73
    {
        printf '%s\n' "$STATUS_COLUMNS"
        find "$dir" -maxdepth 1 -name "job-${job}_task-*.tsv" -exec cat {} + | sort -t $'\t' -k2,2n
    } > "$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "${dir}/job-${job}_summary.tsv"
    failed=$(awk -F '\t' 'NR > 1 && $4 != 0 { n++ } END { print n + 0 }' "${dir}/job-${job}_summary.tsv")
    echo "$failed"
}

# mem_gb_from_slurm
#   Memory for --mem-gb from the job's allocation (SLURM_MEM_PER_NODE or SLURM_MEM_PER_CPU x
#   SLURM_CPUS_PER_TASK, in MB), 90 % of it to leave room for the container and page cache;
#   prints nothing when SLURM gave no figure.
mem_gb_from_slurm() {
    local mb=""
    if [ -n "${SLURM_MEM_PER_NODE:-}" ]; then
        mb=$SLURM_MEM_PER_NODE
    elif [ -n "${SLURM_MEM_PER_CPU:-}" ]; then
        mb=$(( SLURM_MEM_PER_CPU * ${SLURM_CPUS_PER_TASK:-1} ))
    fi
    [[ $mb =~ ^[0-9]+$ ]] && (( mb > 0 )) || return 0
    awk -v mb="$mb" 'BEGIN { printf "%.1f\n", mb * 0.9 / 1024 }'
}

# container_binds BIDS_DIR OUTPUT_DIR WORK_DIR
#   The apptainer bind options, one per line: data read-only, output, work, and the
#   TemplateFlow folder ($TEMPLATEFLOW_HOST, read-only) when a site keeps its own copy.
container_binds() {
    printf '%s\n' -B "$1:/data:ro" -B "$2:/out" -B "$3:/work"
    if [ -n "${TEMPLATEFLOW_HOST:-}" ]; then
        printf '%s\n' -B "${TEMPLATEFLOW_HOST}:/opt/templateflow:ro"
    fi
}

# now_utc: a timestamp for the status lines
now_utc() { date -u +%Y-%m-%dT%H:%M:%SZ; }
