#!/usr/bin/env bash
# Check titan on other torch versions than the default pin: for each version, a virtual
# environment with that torch and titan installed as a user installs it (pip install -e .[dev]),
# a check that the install kept that torch, then the tests that touch every private torch API
# titan uses (titan/compat.py lists them): compat, model, config, pipeline, context parallel,
# dry runs, float8/MX, Muon (torch.optim._muon), torchft, and real 2-process pipeline and
# context-parallel runs of run_train.sh.
#   scripts/check_torch_versions.sh                  # 2.11.0 2.14.1 2.15.0
#   scripts/check_torch_versions.sh 2.12.1 2.13.0    # others
# Each environment (TITAN_VENVS, default ./.venvs/torch-<version>) is made once and reused.
# torch comes from the package index as published (on Linux, the CUDA build with its CUDA
# libraries, about 3 GB a version, 5 GB installed; they run on CPU; pip keeps no cache of them).
# pip's configured constraints are ignored (PIP_CONSTRAINT=/dev/null) so that a machine capping
# torch can still check a newer one.
# Exits 1 if any version fails; the last lines say per version: tests, time, result.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENVS=${TITAN_VENVS:-"$ROOT/.venvs"}
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(2.11.0 2.14.1 2.15.0)
TESTS=(tests/test_compat.py tests/test_model.py tests/test_config.py tests/test_pipeline.py
       "tests/test_transforms.py::test_tp_embedding_gradient_is_formed_on_the_ranks_rows_only"
       tests/test_context_parallel.py tests/test_dry_run.py tests/test_float8.py
       tests/test_muon.py tests/test_torchft.py
       "tests/test_parallel_launch.py::test_run_train_sh_multi_process")
LAUNCH=(-k "not test_run_train_sh_multi_process or pp2 or cp2")  # the pipeline and CP launches

installed_torch() { "$1" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null; }

check_version() {  # version -> 0 when the environment installs and the tests pass
  local version=$1 env="$VENVS/torch-$1" log="$VENVS/torch-$1.log"
  local pip=("$env/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir)
  : >"$log"
  [ -x "$env/bin/python" ] || python3 -m venv "$env" || return 1
  if [ "$(installed_torch "$env/bin/python")" != "$version" ]; then
    echo "[torch $version] installing torch into $env" >&2
    PIP_CONSTRAINT=/dev/null "${pip[@]}" "torch==$version" >>"$log" 2>&1 || {
      tail -5 "$log" >&2
      return 1
    }
  fi
  echo "[torch $version] installing titan" >&2
  # what a user with this torch gets: titan's declared range must keep it, not replace it
  PIP_CONSTRAINT=/dev/null "${pip[@]}" -e "$ROOT[dev]" >>"$log" 2>&1 || {
    tail -5 "$log" >&2
    return 1
  }
  local now
  now=$(installed_torch "$env/bin/python")
  if [ "$now" != "$version" ]; then
    echo "[torch $version] pip install -e .[dev] replaced torch $version with $now" >&2
    return 1
  fi
  echo "[torch $version] tests" >&2
  (cd "$ROOT" && OMP_NUM_THREADS=1 "$env/bin/python" -m pytest -q -p no:cacheprovider \
    "${TESTS[@]}" "${LAUNCH[@]}" 2>&1 | tee -a "$log" | tail -3)
}

mkdir -p "$VENVS"
summary=()
failed=0
for version in "${versions[@]}"; do
  start=$(date +%s)
  if check_version "$version"; then
    result=passed
  else
    result="FAILED (log: $VENVS/torch-$version.log)"
    failed=1
  fi
  counts=$(grep -E "^[0-9]+ (passed|failed)" "$VENVS/torch-$version.log" | tail -1)
  summary+=("$(printf 'torch %-8s %5ss  %s  %s' "$version" "$(($(date +%s) - start))" \
    "$result" "$counts")")
done
printf '%s\n' "${summary[@]}"
exit $failed
