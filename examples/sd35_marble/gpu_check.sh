#!/usr/bin/env bash
# GPU check of the SD3.5 Medium example: real architecture, random weights, one H200, <= 8 min.
#
# Times one RL step of weighted-sum (DiffusionNFT's baseline), marble (gram="shared") and
# marble --gram exact --refresh-every 10 side by side (round-robin, median of 5 steps after a
# warm-up) at 512 px with 4 prompts x 4 images, 10 sampling steps, 2 train timesteps; reports
# their ratios, peak GPU memory and host syncs per step, and writes gpu_check.md/.json to
# $OUT (or examples/sd35_marble/ when $OUT is unset). See gpu_check.py for what a step is.
#
# The GPU image has torch, accelerate, peft, transformers, scipy, jinja2 and joblib but no
# network. Carry these wheels (Python 3.12, x86-64), fetched where pip works, from the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 qpsolvers==4.13.0 osqp==1.1.3 daqp==0.11.0
#
# (about 8 MB; osqp's jinja2/joblib/setuptools and diffusers' huggingface-hub, safetensors,
# regex, requests, pillow are on the image). Then, with .whl carried:
#
#   bash examples/sd35_marble/gpu_check.sh
#
# Extra arguments go to gpu_check.py (e.g. --steps 3, --prompts 8).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out="${OUT:-examples/sd35_marble}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 470 python3 examples/sd35_marble/gpu_check.py --device cuda --resolution 512 --prompts 4 --group-size 4 \
  --sampling-steps 10 --train-timesteps 2 --train-batch-size 4 --steps 5 --out "$out/gpu_check.md" "$@"
python3 examples/sd35_marble/sd35.py > "$out/dry_run.json"
tail -n 1 "$out/dry_run.json"
