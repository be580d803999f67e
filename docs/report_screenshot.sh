#!/usr/bin/env bash
# The README's screenshot of `imgclf runs show --html` (docs/report.png), taken in headless
# Chromium (Debian: apt-get install chromium) from a short run on hymenoptera.
#   bash docs/report_screenshot.sh [DATASET]
set -euo pipefail
dataset=${1:-../shared/datasets/hymenoptera}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export IMGCLF_RUNS_DIR=$work/runs
imgclf train "$dataset" --epochs 6 --image-size 96 > /dev/null 2>&1
imgclf evaluate > /dev/null 2>&1
imgclf export --tflite --onnx > /dev/null 2>&1
imgclf runs show latest --html "$work/report.html"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1100,1900 \
    --screenshot="$work/report.png" "file://$work/report.html" 2> /dev/null
python - "$work/report.png" docs/report.png <<'PY'
import sys
from PIL import Image
Image.open(sys.argv[1]).convert("RGB").save(sys.argv[2], optimize=True)
PY
echo "docs/report.png written"
