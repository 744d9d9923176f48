#!/usr/bin/env bash
# GPU check of issue 15 (bench/gpu_check.py): ViT-S/16 multi-crop training MFU (fp32/bf16, eager/
# compiled), host syncs per step of celldino.train, extraction vs HF ViTModel on the same
# weights, and 5 minutes of ViT-S on the BBBC021 transport scored by bench/real_cells.py.
#
# A session with a GPU runs it once, as its first act:
#   1. here (CPU): .venv/bin/python bench/real_cells.py transport   # transport/bbbc021.npz, ~41 MB
#      (CellProfiler's scores of the same cells travel in bench/real_cells_reference.json, tracked:
#      its 85 MB cache would not fit), then check the size that travels:
#      git ls-files | xargs du -ch | tail -1;  du -sh transport     # together < 64 MiB
#   2. the device call (one; ~1-2 min start + at most 8 min; leaves ~5 of the 15 device minutes):
#      run(command="bash bench/gpu_check.sh", carry=["transport"], timeout_s=480)
#      Results come back in $OUT (gpu_check.json, gpu_check.log, bbbc021_score.json,
#      bbbc021_metrics.jsonl, bbbc021_config.yaml); the tables end the output.
#   3. if a section failed and the machine is still warm, a short rerun of what is missing, e.g.
#      run(command="bash bench/gpu_check.sh --budget 150 --only train_step,extract", timeout_s=200)
#      else give_back(). Record the numbers in docs/benchmarks.md and docs/validation.md.
# The GPU machine has python3 3.12 with torch, numpy, pandas, scikit-learn, transformers,
# safetensors, pyyaml: celldino runs from src/ (no install, no carried wheels needed).
#
# CPU smoke (tiny sizes, synthetic cells; tests/test_gpu_check.py runs it):
#   bash bench/gpu_check.sh --smoke [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -n "${OUT:-}" ]; then
  "$PY" bench/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi
exec "$PY" bench/gpu_check.py "$@"
