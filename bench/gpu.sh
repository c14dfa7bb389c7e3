#!/usr/bin/env bash
# Every GPU check of the optimizer engine (issue [1/5]) on one H100, by stage (timeouts: tests
# 150 s, throughput 360 s, step 90 s, svd 60 s, eightbit 120 s): the CUDA tests,
# bench/throughput.py (tokens/s against torch AdamW(fused=True) at llama_60m/350m/1b, with a
# torch.profiler summary), bench/step.py on CUDA (the optimizer step alone, 60m),
# bench/svd.py (exact against randomized SVD), bench/eightbit.py (8-bit update backends) and
# bench/distributed.py (FSDP2 at world size 1 against unsharded, 180 s; issue [3/5]); opt-in
# with STAGES=glue: bench/glue.py --preset gpu (480 s; issue [6]; needs the shared data, see below)
# STAGES=configs: bench/configs.py, the shipped 7B configs' measured peaks ([2/5], about 3 minutes)
# and STAGES=quality: bench/quality.py --preset gpu (timeout 540 s; its 75 runs need about 580 s by estimate, so a second call on the warm machine may finish them; issue [5/5]; after --prepare-quality).
# One device call runs at most 10 minutes, so run it as two: STAGES="tests throughput step"
# (560 s on 2026-11-26) and STAGES="svd eightbit fsdp". The throughput rows are written after each
# row, so a timeout keeps what finished; rerun the rest with bench/throughput.py --sizes
# llama_1b. Everything it writes lies under $OUT (default bench/out/gpu):
#   tests.log, step/step.md, step/step.png, throughput/throughput.json, throughput/throughput.md,
#   throughput/profile.md, summary.md   (7 files: the device tool brings back at most 8).
#
#   bash bench/gpu.sh --fetch-wheels   # here, once: torchao, galore-torch, bitsandbytes wheels for the GPU
#                                      # machine's Python 3.12 into .whl/ (git-ignored)
#   bash bench/gpu.sh                  # on the GPU machine: device run, carry [".whl"], timeout 600
#   bash bench/gpu.sh --dry-run        # on a CPU: the same steps at toy sizes (checks the script)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  for pkg in torchao==0.18.0 galore-torch==1.0 bitsandbytes==0.50.2; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "$pkg" || exit 1
  done
  ls -la .whl
  exit 0
fi

if [ "${1:-}" = "--prepare-quality" ]; then
  # bench/quality.py --preset gpu's inputs for the device machine, in .gpudata/ (git-ignored, about
  # 25 MB; carry [".gpudata"] alone: with .whl's bitsandbytes it passes the 64 MiB limit, so
  # galore-torch, which imports bitsandbytes, is left out there): the first 30,000 blogs training
  # documents (the stream of 25,600 that 800 steps x 32 read, through the trainer's 1000-document
  # shuffle buffer, is the full file's), the validation file, the t5-base tokenizer, and the wheels
  # of torchao and pytorch-optimizer.
  SHARED=${OSD_SHARED_DATA:-../shared/data}
  mkdir -p .gpudata/whl
  chmod -R u+w .gpudata
  python3 - "$SHARED/blogs/blogs-train.jsonl.gz" .gpudata/blogs-train.jsonl.gz <<'PY' || exit 1
import gzip, itertools, sys
with gzip.open(sys.argv[1], "rt") as src, gzip.open(sys.argv[2], "wt") as dst:
    dst.writelines(itertools.islice(src, 30000))
PY
  rm -rf .gpudata/t5-base .gpudata/blogs-validation.jsonl.gz
  cp "$SHARED/blogs/blogs-validation.jsonl.gz" .gpudata/ && cp -r "$SHARED/tokenizers/t5-base" .gpudata/ || exit 1
  chmod -R u+w .gpudata
  for pkg in torchao==0.18.0 pytorch_optimizer==4.1.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .gpudata/whl "$pkg" || exit 1
  done
  du -sh .gpudata
  exit 0
fi

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ $DRY = 1 ]; then
  PY=${PY:-.venv/bin/python}
  [ -x "$PY" ] || { make venv >/dev/null && PY=.venv/bin/python; }
else
  PY=${PY:-python3}
  for wheels in .whl .gpudata/whl; do
    if [ -d $wheels ]; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels/*.whl \
        || echo "warning: wheels in $wheels did not install"
      export PYTHONPATH=/tmp/site
    fi
  done
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"
START=$SECONDS
stage() { echo "== [$((SECONDS - START)) s] $*" | tee -a "$OUT/summary.md"; }

stage "environment"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1 | tee -a "$OUT/summary.md"

# STAGES (default "tests throughput step svd eightbit fsdp") picks the parts to run, e.g. STAGES="tests step"
STAGES=${STAGES:-tests throughput step svd eightbit fsdp}
has() { [[ " $STAGES " == *" $1 "* ]]; }

has tests && stage "CUDA tests (tests/test_cuda.py, CUDA peak-memory tests)"
has tests && timeout 150 $PY -m pytest -q -p no:cacheprovider --durations 8 tests/test_cuda.py tests/test_memory.py tests/test_eightbit.py -k "cuda" 2>&1 | tee "$OUT/tests.log" | tail -n 5 | tee -a "$OUT/summary.md"

if [ $DRY = 1 ]; then
  STEP_ARGS=(--device cpu --models 60m --methods "torch AdamW foreach,osd AdamW online_pca,osd AdamW8bit online_pca" --repeats 1 --refresh-repeats 0 --warmup 1)
  TP_ARGS=(--dry-run --profile osd,adamw_fused)
else
  STEP_ARGS=(--device cuda --models 60m --repeats 5 --refresh-repeats 1)
  # galore-torch imports bitsandbytes at import time; the GPU image has none (too big to carry)
  if ! $PY -c "import galore_torch" 2>/dev/null; then
    STEP_ARGS+=(--methods "$($PY -c "import sys; sys.path.insert(0, 'bench'); import step; print(','.join(m for m in step.DEFAULT_METHODS if not m.startswith('galore')))")")
  fi
  TP_ARGS=(--profile adamw_fused,osd,galore,adamw8bit)
fi

# throughput first: the issue's GPU targets are about it, and it is the longest part
has throughput && stage "bench/throughput.py ${TP_ARGS[*]}"
has throughput && timeout 360 $PY bench/throughput.py "${TP_ARGS[@]}" --out "$OUT/throughput" 2>&1 | tee "$OUT/throughput.log" | grep -v "^  " | tail -n 40 | tee -a "$OUT/summary.md"
rm -f "$OUT/throughput.log"

has step && stage "bench/step.py ${STEP_ARGS[*]}"
has step && timeout 90 $PY bench/step.py "${STEP_ARGS[@]}" --out "$OUT/step" 2>&1 | grep -v "^\[" | tail -n 30 | tee -a "$OUT/summary.md"

# 8-bit Adam update backends on one stack of 16 x 2048 x 2048 values (the 8-bit storage choice)
if has eightbit && [ $DRY = 0 ]; then
  stage "bench/eightbit.py --device cuda --numel 67108864 --stack 16 --compile"
  timeout 120 $PY bench/eightbit.py --device cuda --numel 67108864 --stack 16 --compile --repeats 5 2>&1 | grep -v Warning | tail -n 14 | tee -a "$OUT/summary.md"
fi

# [2/5]: the shipped 7B configs' peaks against osd-memory --config (opt-in: STAGES=configs, about
# 3 minutes; randomized first bases, as the exact SVD of 224 7B matrices takes minutes)
if has configs && [ $DRY = 0 ]; then
  stage "bench/configs.py: configs/llama_7b_sgd.toml, llama_7b_lean.toml, llama_7b.toml --total_batch_size 16"
  timeout 300 $PY bench/configs.py --configs configs/llama_7b_sgd.toml,configs/llama_7b_lean.toml \
    --out "$OUT/configs" -- --svd_method randomized 2>&1 | grep -v Warning | tail -n 8 | tee -a "$OUT/summary.md"
  timeout 200 $PY bench/configs.py --configs configs/llama_7b.toml --out "$OUT/configs-seed" \
    -- --svd_method randomized --total_batch_size 16 2>&1 | grep -v Warning | tail -n 6 | tee -a "$OUT/summary.md"
fi

# exact against randomized SVD of one llama_1b and one llama_7b matrix ([2/5]: the first step's bases)
if has svd && [ $DRY = 0 ]; then  # (its sizes take minutes on a CPU)
  stage "bench/svd.py --device cuda"
  timeout 60 $PY bench/svd.py --device cuda 2>&1 | tail -n 4 | tee -a "$OUT/summary.md"
fi

# FSDP2 at world size 1 against the same model unsharded ([3/5]: the target is within 5%)
if has fsdp && [ $DRY = 0 ]; then
  FSDP_ARGS=(--device cuda --worlds 1 --unsharded --model llama_350m --dtype bfloat16 --batch 8 --seq 256 --rank 256 --steps 10 --methods torch-adamw,osd-online_pca)
  stage "bench/distributed.py ${FSDP_ARGS[*]}"
  # its table goes to summary.md only (the device tool brings back at most 8 files)
  timeout 180 $PY bench/distributed.py "${FSDP_ARGS[@]}" --out "$(mktemp -d)" 2>&1 | grep "^|" | tee -a "$OUT/summary.md"
fi

# Training quality ([5/5]), opt-in (STAGES=quality, 540 s): bench/quality.py --preset gpu on the
# inputs that --prepare-quality put in .gpudata (carry [".gpudata"]). Finished runs stay in
# /tmp/osd-quality-gpu: the same call again on the still-warm machine continues; what finished is
# reported each time (results.md, the two plots and results.json under $OUT/quality).
if has quality && [ $DRY = 0 ]; then
  if [ -f .gpudata/blogs-train.jsonl.gz ]; then
    Q_METHODS=$($PY -c "import sys; sys.path.insert(0, 'bench'); import quality as q; print(','.join(k for k in q.default_methods(q.PRESETS['gpu']) if q.available(k)))")
    stage "bench/quality.py --preset gpu --methods $Q_METHODS"
    timeout 540 $PY bench/quality.py --preset gpu --methods "$Q_METHODS" --out /tmp/osd-quality-gpu \
      --train_data .gpudata/blogs-train.jsonl.gz --eval_data .gpudata/blogs-validation.jsonl.gz \
      --tokenizer .gpudata/t5-base 2>&1 | grep -v "^ *eval loss\|: training" | tail -n 30 | tee -a "$OUT/summary.md"
    mkdir -p "$OUT/quality"
    for f in results.md results.json eval_loss.png pareto.png; do
      [ -f /tmp/osd-quality-gpu/$f ] && cp /tmp/osd-quality-gpu/$f "$OUT/quality/"
    done
    ls /tmp/osd-quality-gpu/runs 2>/dev/null | wc -l | sed 's/^/finished or started runs: /' | tee -a "$OUT/summary.md"
  else
    stage "quality skipped: run 'bash bench/gpu.sh --prepare-quality' here first and carry .gpudata"
  fi
fi

# GLUE fine-tuning ([6]), opt-in (STAGES=glue): bench/glue.py --preset gpu (480 s). It needs
# transformers, peft, scikit-learn and scipy, and the shared MiniLM and GLUE data under
# $OSD_SHARED_DATA (default ../shared/data): the device tool cannot carry the 88 MB model.
if has glue && [ $DRY = 0 ]; then  # (minutes of runs on a CPU)
  GLUE_DATA=${OSD_SHARED_DATA:-../shared/data}
  if $PY -c "import transformers, peft, sklearn, scipy" 2>/dev/null && [ -d "$GLUE_DATA/glue" ] \
    && [ -d "$GLUE_DATA/models/all-MiniLM-L6-v2" ]; then
    stage "bench/glue.py --preset gpu"
    OSD_SHARED_DATA=$GLUE_DATA timeout 480 $PY bench/glue.py --preset gpu --time_limit 420 --out "$(mktemp -d)" 2>&1 \
      | grep -v "^\[" | tail -n 14 | tee -a "$OUT/summary.md"
  else
    stage "glue skipped: needs transformers, peft, scikit-learn, scipy and $GLUE_DATA/{glue,models/all-MiniLM-L6-v2}"
  fi
fi

stage "done"
