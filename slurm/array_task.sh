#!/usr/bin/env bash
# One task of a rerunnable array job (used by shards.sbatch and cache.sbatch).
#
#   slurm/array_task.sh videos|shards INPUT OUT -- CMD [ARGS...]
#
# Part I = SLURM_ARRAY_TASK_ID of K parts (K = OSP_NUM_PARTS, else the number fixed by the first run
# in OUT/parts/num_parts, else SLURM_ARRAY_TASK_MAX + 1). The part's inputs (a contiguous slice of the
# sorted input list) go to a list file; CMD runs (with OSP_LAUNCHER_ARGS, e.g. --torchrun) through launcher.sh with `@INPUTS@` and `@OUTPUT@` in
# its arguments replaced by that list and by a work folder, which is renamed to OUT/parts/part-IIIII
# only when CMD succeeds. A rerun skips finished parts (after checking that their inputs did not
# change) and redoes unfinished ones. Every task then merges, under flock, whatever is finished:
# once all parts are, OUT/shard-*.tar + OUT/manifest.json cover every input exactly once.
set -euo pipefail

KIND="$1"; INPUT="$2"; OUT="$3"; shift 3
[[ "${1:-}" == "--" ]] && shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${OSP_PYTHON:-python}"
export PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"   # data_pipeline (array_parts) from this checkout

if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    echo "array_task.sh: not an array task (SLURM_ARRAY_TASK_ID unset); submit with sbatch --array=0-<K-1>" >&2
    exit 2
fi
PART="$SLURM_ARRAY_TASK_ID"
mkdir -p "$OUT/parts"
NUM_FILE="$OUT/parts/num_parts"
if [[ -f "$NUM_FILE" ]]; then
    K="$(cat "$NUM_FILE")"
    if [[ -n "${OSP_NUM_PARTS:-}" && "$OSP_NUM_PARTS" != "$K" ]]; then
        echo "array_task.sh: $OUT was split into $K parts by an earlier run, not OSP_NUM_PARTS=$OSP_NUM_PARTS;" \
             "keep $K or use a new output folder" >&2
        exit 2
    fi
else
    K="${OSP_NUM_PARTS:-$((SLURM_ARRAY_TASK_MAX + 1))}"
    TMPN="$NUM_FILE.tmp$$"; echo "$K" >"$TMPN"
    ln "$TMPN" "$NUM_FILE" 2>/dev/null || true   # first writer wins (atomic, no overwrite)
    rm -f "$TMPN"
    K="$(cat "$NUM_FILE")"
fi
NAME="$(printf 'part-%05d' "$PART")"
DONE="$OUT/parts/$NAME"
EXT=$([[ "$KIND" == videos ]] && echo jsonl || echo txt)
LIST="$OUT/parts/.$NAME.inputs.$EXT"

"$PY" -m data_pipeline.array_parts split --kind "$KIND" --input "$INPUT" --part "$PART" --num-parts "$K" --out "$LIST"
if [[ -f "$DONE/manifest.json" ]]; then
    if ! cmp -s "$LIST" "$DONE/inputs.$EXT"; then
        echo "array_task.sh: $DONE was built from other inputs than $INPUT gives now;" \
             "use a new output folder (or delete $DONE to rebuild it)" >&2
        exit 2
    fi
    rm -f "$LIST"
    echo "array_task.sh: $NAME of $K already done; skipping"
else
    WORK="$OUT/parts/.work-$NAME"
    mkdir -p "$WORK"
    INPUTS="$LIST"   # videos: a .jsonl manifest; shards: a comma list of shard files
    [[ "$KIND" == shards ]] && INPUTS="$(paste -sd, "$LIST")"
    ARGS=()
    for a in "$@"; do a="${a//@INPUTS@/$INPUTS}"; ARGS+=("${a//@OUTPUT@/$WORK}"); done
    read -ra LAUNCH_ARGS <<<"${OSP_LAUNCHER_ARGS:-}"   # e.g. "--torchrun --nproc-per-node 8"
    echo "array_task.sh: $NAME of $K: $(wc -l <"$LIST") inputs -> $DONE"
    srun --ntasks=1 --nodes=1 "$HERE/launcher.sh" "${LAUNCH_ARGS[@]}" -- "${ARGS[@]}"
    mv "$LIST" "$WORK/inputs.$EXT"
    rm -rf "$DONE"
    mv "$WORK" "$DONE"
fi
flock -w 600 "$OUT/parts/.merge.lock" "$PY" -m data_pipeline.array_parts merge --out "$OUT" --num-parts "$K" --source "$INPUT"
