#!/usr/bin/env bash
# Remake docs/images/report-single-run.png (issue 20): a real SmolLM2-135M run (RTN w4 g64, quick perplexity of
# the run and of the dense model, which becomes the run's dense reference), its fidelity to the dense model and
# a small zero-shot check of both (PIQA, 100 examples), its `lmcompose report`, and a screenshot of report.html
# in headless Chromium, cropped and shrunk with Pillow.
#
#   bash benchmarks/screenshot_report.sh [WORK_DIR]      # default /tmp/lmcompose-shot; ~20-25 min on one core
#
# Needs: the project's virtualenv active, the data ($LMCOMPOSE_DATA_DIR or the data shipped with lmcompose),
# the SmolLM2 weights in the Hugging Face cache (or a reachable hub), and Chromium (`apt-get install chromium`).
# SKIP_RUN=1 reuses WORK_DIR/smollm2-135m-rtn-w4g64 (and its recorded results) when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/lmcompose-shot}
png=docs/images/report-single-run.png
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$work" "$(dirname "$png")"

run=$work/smollm2-135m-rtn-w4g64
if [[ ${SKIP_RUN:-0} != 1 || ! -f $run/report.json ]]; then
  lmcompose compress --model smollm2-135m --preset rtn-w4g64 --eval quick --out "$run" --overwrite  # ~17 min
  lmcompose fidelity --compressed "$run" --protocol quick                                           # ~1.5 min
  lmcompose zeroshot --model "$run" --tasks piqa --limit 100                                        # ~40 s
  lmcompose zeroshot --model smollm2-135m --tasks piqa --limit 100 --dense-for "$run"               # ~40 s
fi
lmcompose report "$run" --out "$work/report" --title "lmcompose report: SmolLM2-135M, RTN w4 g64" --overwrite

# The top of the report: its title, the dense-reference table and the runs table (the HTML up to the first
# figure's heading; the figures follow in the full report).
python - "$work/report/report.html" "$work/top.html" <<'PY'
import re
import sys

src, dst = sys.argv[1:]
html = open(src, encoding="utf-8").read()
heads = [m.start() for m in re.finditer(r"<h2[ >]", html)]
cut = heads[2] if len(heads) > 2 else len(html)
open(dst, "w", encoding="utf-8").write(html[:cut] + "</body></html>\n")
PY

chrome=$(command -v chromium || command -v chromium-browser || command -v google-chrome)
"$chrome" --headless=new --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
  --window-size=1200,1200 --screenshot="$work/top.png" "file://$(realpath "$work/top.html")" 2>/dev/null

# Trim the page below the report's card, shrink to at most 1000 px wide, and write a small palette PNG.
python - "$work/top.png" "$png" <<'PY'
import sys

from PIL import Image, ImageChops, ImageOps

src, dst = sys.argv[1:]
img = Image.open(src).convert("RGB")
bg = Image.new("RGB", img.size, img.getpixel((img.width - 1, img.height - 1)))
box = ImageChops.difference(img, bg).getbbox() or (0, 0, img.width, img.height)
img = img.crop((0, 0, img.width, box[3]))  # down to the end of the page's white card
if img.width > 1000:
    img = ImageOps.contain(img, (1000, img.height), Image.LANCZOS)
img.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
print(f"wrote {dst}: {img.width}x{img.height}")
PY
ls -l "$png"
