#!/usr/bin/env bash
# Carry the baseline z-vector cache (and the context prefixes it was computed with) across machines:
# long reference and scale runs span sessions, and a fresh machine starts with an empty
# ~/.cache/meg_harness. Both are small (one ~74 KB safetensors file per 16 edits and site) and
# content-addressed (model, edit tokens, z hyper-parameters), so a restored file is only used by a run
# whose chunk it is.
#   bash scripts/z_cache.sh save      # ~/.cache/meg_harness -> results/cache (then commit results/cache)
#   bash scripts/z_cache.sh restore   # results/cache -> ~/.cache/meg_harness (before resuming a run)
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${MEG_HARNESS_CACHE:-$HOME/.cache/meg_harness}"
kept=results/cache
case "${1:-}" in
  save) from="$cache"; to="$kept" ;;
  restore) from="$kept"; to="$cache" ;;
  *) echo "usage: bash scripts/z_cache.sh save|restore" >&2; exit 2 ;;
esac
for folder in baseline_z context_prefixes; do
  [ -d "$from/$folder" ] || continue
  mkdir -p "$to/$folder"
  # finished files only (atomic writes leave .name.tmp files while a chunk is being written)
  find "$from/$folder" -maxdepth 1 -type f ! -name '.*' -exec cp -n {} "$to/$folder/" \;
  echo "$folder: $(ls "$to/$folder" | wc -l) files in $to/$folder"
done
