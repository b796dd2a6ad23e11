#!/usr/bin/env bash
# Dry-run every shipped config exactly as written, at the NGPU its header names (1 if none):
# one traced step per config (COMM_MODE=fake_backend), a line each with the time it took and the
# highest per-rank peak. Exits 1 if a config fails or does not fit dry_run.memory_gib (80).
#   scripts/dry_run_configs.sh [titan/train_configs/llama3_405b.toml ...]
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mktemp -d)
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=("$ROOT"/titan/train_configs/*.toml)
failed=0
printf '%-26s %6s %8s  %s\n' config NGPU seconds result
for config in "${configs[@]}"; do
  name=$(basename "$config" .toml)
  ngpu=$(head -5 "$config" | grep -o 'NGPU=[0-9]*' | head -1 | cut -d= -f2)
  ngpu=${ngpu:-1}
  start=$(date +%s%N)
  COMM_MODE=fake_backend NGPU=$ngpu CONFIG_FILE=$config "$ROOT/run_train.sh" \
    --job.dump_folder "$OUT/$name" > "$OUT/$name.log" 2>&1
  rc=$?
  seconds=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  result=$(grep -E "^  (fits|DOES NOT FIT)" "$OUT/$name.log" | sed 's/^  //')
  if [ $rc -ne 0 ]; then
    failed=1
    [ -n "$result" ] || result="failed (exit $rc): $(grep -v '^\[rank' "$OUT/$name.log" | tail -1)"
  fi
  printf '%-26s %6s %8.1f  %s\n' "$name" "$ngpu" "$seconds" "$result"
done
[ $failed -eq 0 ] || echo "logs: $OUT"
exit $failed
