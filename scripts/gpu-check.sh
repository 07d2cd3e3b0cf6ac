#!/usr/bin/env bash
# On a machine with a CUDA GPU: run the CUDA-marked tests, then execute every chapter that has GPU cells
# (front matter `peftlab: gpu: true`) top to bottom, so its `# GPU:` cells run for real. What those cells
# measure is recorded, with its provenance, in results/gpu/*.json: commit it, and the book's CPU build draws
# it in the chapters' "Measured on a GPU" sections.
# Usage: bash scripts/gpu-check.sh   (after: pip install -r requirements.txt, or with Colab's torch)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python

"$PY" - <<'PYEOF'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu-check: no CUDA device visible to torch (torch %s)" % torch.__version__)
print("gpu-check:", torch.cuda.get_device_name(0), "torch", torch.__version__, "CUDA", torch.version.cuda)
PYEOF

echo "== CUDA tests"
set +e
"$PY" -m pytest -q -m cuda -rP -p no:cacheprovider   # -rP: the measured differences the tests print
rc=$?
set -e
[ $rc -eq 0 ] || { [ $rc -eq 5 ] && echo "gpu-check: no CUDA test was collected"; exit $rc; }   # 5: none collected is a failure here

echo "== chapters with GPU cells (recording into results/gpu)"
export PEFTLAB_RECORD_DIR="$PWD/results/gpu"   # peftlab.book.records.RECORD_DIR_ENV
mkdir -p "$PEFTLAB_RECORD_DIR"
for md in book/chapters/*.md; do
  if sed -n '/^---$/,/^---$/p' "$md" | grep -q '^ *gpu: *true'; then
    timeout 900 "$PY" scripts/run_chapter.py "$md"
  fi
done
git status --short -- results/gpu || true
echo "gpu-check: all passed; commit results/gpu to put these measurements in the book"
