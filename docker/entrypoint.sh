#!/bin/sh
# Container entry point: make sure HOME and the caches are writable, then run bids_uad.
# Works with a read-only root filesystem (docker run --read-only --tmpfs /tmp), under an
# arbitrary --user uid, and under Apptainer (which sets HOME to the host's home).
set -eu

writable_dir() {
    mkdir -p "$1" 2>/dev/null && [ -w "$1" ]
}

if ! writable_dir "${HOME:-/tmp/home}"; then
    HOME="/tmp/home-$(id -u)"
fi
export HOME
if ! writable_dir "$HOME"; then
    echo "bids_uad: error: no writable HOME ($HOME); mount a tmpfs on /tmp (docker run --tmpfs /tmp)" >&2
    exit 73
fi
# caches default to HOME (set in the image), but a HOME that moved takes them along
for var in XDG_CACHE_HOME MPLCONFIGDIR NUMBA_CACHE_DIR TORCH_HOME BIDS_UAD_CACHE; do
    eval "dir=\${$var:-}"
    if [ -z "$dir" ] || ! writable_dir "$dir"; then
        case $var in
            XDG_CACHE_HOME) dir="$HOME/.cache" ;;
            MPLCONFIGDIR) dir="$HOME/.config/matplotlib" ;;
            NUMBA_CACHE_DIR) dir="$HOME/.cache/numba" ;;
            TORCH_HOME) dir="$HOME/.cache/torch" ;;
            BIDS_UAD_CACHE) dir="$HOME/.cache/bids_uad" ;;
        esac
        mkdir -p "$dir"
        export "$var=$dir"
    fi
done

exec bids_uad "$@"
