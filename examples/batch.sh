#!/usr/bin/env bash
# Animate many portrait/audio pairs, one `avatarcli animate --json` run each, and keep going past failures.
#
# Usage:  examples/batch.sh PAIRS.txt [OUT_DIR] [-- EXTRA_ANIMATE_FLAGS...]
#   PAIRS.txt  one pair per line: PORTRAIT AUDIO [OUTPUT]   (whitespace-separated; blank lines and # comments
#              are skipped; relative paths are relative to the folder of PAIRS.txt; paths may not contain spaces)
#   OUT_DIR    where videos and results.jsonl go (default: ./batch-out)
#   Example:   examples/batch.sh examples/pairs.txt out -- --preset fast --seed 7
#
# Every pair adds one JSON line to OUT_DIR/results.jsonl (and stdout): avatarcli's own summary on success, or
# {"portrait", "audio", "output", "exit_code", "error"} on failure. avatarcli exits 0 when the video was written
# (silent audio too: it warns and still writes the video), 2 for a bad input (unreadable image or audio, no
# samples, ...), 3 for an environment problem (network, weights, memory, disk), 130 when interrupted, 1 for a bug.
# This script exits 0 if every pair succeeded, 2 if the only failures were bad inputs, 1 otherwise; Ctrl-C stops
# the whole batch (exit 130).
# Set AVATARCLI to run another command, e.g. AVATARCLI="python -m avatarcli".

set -u

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi

pairs_file=$1
shift
out_dir=./batch-out
if [[ $# -gt 0 && "$1" != "--" ]]; then
    out_dir=$1
    shift
fi
[[ $# -gt 0 && "$1" == "--" ]] && shift
extra_flags=("$@")

if [[ ! -f "$pairs_file" ]]; then
    echo "batch.sh: pairs file not found: $pairs_file" >&2
    exit 2
fi
mkdir -p "$out_dir" || exit 2
read -r -a avatarcli <<< "${AVATARCLI:-avatarcli}"
list_dir=$(cd "$(dirname "$pairs_file")" && pwd)
results="$out_dir/results.jsonl"
: > "$results"
stderr_log=$(mktemp)
trap 'rm -f "$stderr_log"' EXIT

json_string() {  # $1 -> a JSON string literal
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\t'/\\t}
    s=${s//$'\r'/}
    s=${s//$'\n'/ }
    printf '"%s"' "$s"
}

resolve() {  # relative paths in the list are relative to the list's folder
    if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$list_dir" "$1"; fi
}

status=0
ok=0
failed=0
while read -r portrait audio output _ || [[ -n "${portrait:-}" ]]; do
    [[ -z "${portrait:-}" || "$portrait" == \#* ]] && continue
    if [[ -z "${audio:-}" ]]; then
        echo "batch.sh: skipping '$portrait': no audio file on that line" >&2
        continue
    fi
    portrait=$(resolve "$portrait")
    audio=$(resolve "$audio")
    if [[ -z "${output:-}" ]]; then
        name=$(basename "${portrait%.*}")_$(basename "${audio%.*}")
        output="$out_dir/$name.mp4"
    fi

    echo "batch.sh: $portrait + $audio -> $output" >&2
    if line=$("${avatarcli[@]}" animate "$portrait" --audio "$audio" -o "$output" --json "${extra_flags[@]}" \
                 2> "$stderr_log" < /dev/null); then
        printf '%s\n' "$line" | tail -n 1 | tee -a "$results"
        ok=$((ok + 1))
    else
        code=$?
        message=$(grep -v '^[[:space:]]*$' "$stderr_log" | tail -n 1)
        printf '{"portrait": %s, "audio": %s, "output": %s, "exit_code": %d, "error": %s}\n' \
            "$(json_string "$portrait")" "$(json_string "$audio")" "$(json_string "$output")" "$code" \
            "$(json_string "$message")" | tee -a "$results"
        echo "batch.sh: failed (exit $code): $message" >&2
        failed=$((failed + 1))
        if [[ $code -eq 130 ]]; then
            echo "batch.sh: interrupted; $ok succeeded before that" >&2
            exit 130
        fi
        if [[ $code -eq 2 ]]; then
            [[ $status -eq 0 ]] && status=2
        else
            status=1
        fi
    fi
done < "$pairs_file"

echo "batch.sh: $ok succeeded, $failed failed; results in $results" >&2
exit "$status"
