#!/usr/bin/env bash
# The pictures of README "Inference and visualization", made from the trained demo checkpoint,
# and the check that tools/predict.py's COCO results JSON on the whole demo val split scores the
# AP of --eval-only (pycocotools on both).
#
#   tools/make_docs_figures.sh [CHECKPOINT]      (default output/dab_detr_demo/model_final.pth)
#
# Environment: PYTHON (default .venv/bin/python), IMAGE (the val image to draw, default 000003.png),
# METRICS (default output/dab_detr_demo/metrics.json). Writes docs/*.png and, under
# output/docs_figures/, the results JSON and the two APs (ap_check.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CKPT=${1:-output/dab_detr_demo/model_final.pth}
CFG=configs/dab_detr_demo.py
OUT=output/docs_figures
VAL=${DETECTRON2_DATASETS:-datasets}/dab_demo/val
JSON_GT=${DETECTRON2_DATASETS:-datasets}/dab_demo/annotations/val.json
IMAGE=$VAL/${IMAGE:-000003.png}
METRICS=${METRICS:-output/dab_detr_demo/metrics.json}
W="train.init_checkpoint=$CKPT"

[ -f "$CKPT" ] || { echo "make_docs_figures: no checkpoint $CKPT (train the demo first: make demo)" >&2; exit 1; }
[ -d "$VAL" ] || { echo "make_docs_figures: no demo val split in $VAL (make demo generates it)" >&2; exit 1; }
mkdir -p docs "$OUT"

echo "== detections drawn by tools/predict.py"
"$PY" tools/predict.py --config-file $CFG --input "$IMAGE" --output docs/predict_demo.png \
    --confidence-threshold 0.3 --scale 2 "$W"

echo "== the paper's pictures (tools/visualize.py)"
"$PY" tools/visualize.py anchors --config-file $CFG --output docs/anchors_demo.png "$W"
"$PY" tools/visualize.py layers "$IMAGE" --config-file $CFG --top-k 3 --output docs/layers_demo.png "$W"
"$PY" tools/visualize.py attention "$IMAGE" --config-file $CFG --top-k 2 --output docs/attention_demo.png "$W"
"$PY" tools/visualize.py attention "$IMAGE" --config-file $CFG --top-k 1 --temperature 10000 \
    --output docs/attention_demo_t10000.png "$W"
if [ -f "$METRICS" ]; then
    "$PY" tools/visualize.py curves "$METRICS" --output docs/curves_demo.png
else
    echo "no $METRICS: docs/curves_demo.png not made" >&2
fi

echo "== COCO results JSON of the whole val split vs --eval-only"
"$PY" tools/predict.py --config-file $CFG --input "$VAL" --json $OUT/demo_val_results.json "$W"
"$PY" tools/lazyconfig_train_net.py --config-file $CFG --eval-only "$W" train.output_dir=$OUT/eval_only \
    | tee $OUT/eval_only.log
"$PY" - "$JSON_GT" $OUT/demo_val_results.json $OUT/eval_only/coco_instances_results.json <<'PYEOF' | tee $OUT/ap_check.txt
import contextlib, io, sys
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

def ap(gt, results):
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(gt, gt.loadRes(results), "bbox")
        e.evaluate(); e.accumulate(); e.summarize()
    return 100 * e.stats[0]

with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(sys.argv[1])
ours, theirs = ap(gt, sys.argv[2]), ap(gt, sys.argv[3])
print(f"tools/predict.py JSON: AP {ours:.2f}; --eval-only (COCOEvaluator's results file): AP {theirs:.2f}; "
      f"difference {abs(ours - theirs):.3f}")
PYEOF
ls -l docs/*.png
