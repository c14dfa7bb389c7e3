#!/usr/bin/env bash
# Every GPU check of the optimizer engine (issue [1/5]) in ONE call of under 8 minutes on one
# H100: the CUDA tests, bench/step.py on CUDA (optimizer step alone, op counts) and
# bench/throughput.py (tokens/s against torch AdamW(fused=True) at llama_60m/350m/1b, with a
# torch.profiler summary). Everything it writes lies under $OUT (default bench/out/gpu):
#   tests.log, step/step.md, step/step.png, throughput/throughput.json, throughput/throughput.md,
#   throughput/profile.md, summary.md   (7 files: the device tool brings back at most 8).
#
#   bash bench/gpu.sh --fetch-wheels   # here, once: torchao + galore-torch wheels for the GPU
#                                      # machine's Python 3.12 into .whl/ (git-ignored)
#   bash bench/gpu.sh                  # on the GPU machine: device run, carry [".whl"], timeout 600
#   bash bench/gpu.sh --dry-run        # on a CPU: the same steps at toy sizes (checks the script)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  for pkg in torchao==0.18.0 galore-torch==1.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "$pkg" || exit 1
  done
  ls -la .whl
  exit 0
fi

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ $DRY = 1 ]; then
  PY=${PY:-.venv/bin/python}
  [ -x "$PY" ] || { make venv >/dev/null && PY=.venv/bin/python; }
else
  PY=${PY:-python3}
  if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || echo "warning: wheels in .whl did not install"
    export PYTHONPATH=/tmp/site
  fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"
START=$SECONDS
stage() { echo "== [$((SECONDS - START)) s] $*" | tee -a "$OUT/summary.md"; }

stage "environment"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1 | tee -a "$OUT/summary.md"

stage "CUDA tests (tests/test_cuda.py, CUDA peak-memory tests)"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_memory.py -k "cuda" 2>&1 | tee "$OUT/tests.log" | tail -n 5 | tee -a "$OUT/summary.md"

if [ $DRY = 1 ]; then
  STEP_ARGS=(--device cpu --models 60m --methods "torch AdamW foreach,osd AdamW online_pca,osd AdamW8bit online_pca" --repeats 1 --refresh-repeats 0 --warmup 1)
  TP_ARGS=(--dry-run --profile osd,adamw_fused)
else
  STEP_ARGS=(--device cuda --models 60m,350m --repeats 3 --refresh-repeats 1)
  TP_ARGS=(--profile adamw_fused,osd,galore,adamw8bit)
fi

stage "bench/step.py ${STEP_ARGS[*]}"
timeout 150 $PY bench/step.py "${STEP_ARGS[@]}" --out "$OUT/step" 2>&1 | grep -v "^\[" | tail -n 30 | tee -a "$OUT/summary.md"

stage "bench/throughput.py ${TP_ARGS[*]}"
timeout 330 $PY bench/throughput.py "${TP_ARGS[@]}" --out "$OUT/throughput" 2>&1 | tee "$OUT/throughput.log" | grep -v "^  " | tail -n 40 | tee -a "$OUT/summary.md"
rm -f "$OUT/throughput.log"

stage "done"
