#!/bin/bash
# The GPU checks of benchmarks/README.md as one command for a short lease (~6-7 minutes on an H200), each step
# under its own time limit, its output in $OUT (or ./gpu_out) as it goes, so a step that runs long costs only
# itself. Wheels in .whl/ (TRL 1.16 and what the card's image lacks: see benchmarks/README.md) are installed
# first into /tmp/site.
#
#     bash benchmarks/gpu_runbook.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
stamp() { echo "== $1 at +$(($(date +%s) - T0)) s" | tee -a "$OUT/steps.txt"; }
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$OUT/pip.txt" 2>&1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
{
    nvidia-smi --query-gpu=name,driver_version --format=csv
    python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
    python3 -c "import trl; print('trl', trl.__version__)"
} >"$OUT/env.txt" 2>&1
stamp env
timeout 150 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_kernels_logits.py tests/test_kernels_hidden.py \
    tests/test_kernels_cuda_compile.py >"$OUT/tests.txt" 2>&1
stamp tests
timeout 120 python3 benchmarks/kernels.py --paths logits --ns 16k --skip compiled >"$OUT/kernels_logits.txt" 2>&1
stamp kernels_logits
timeout 60 python3 benchmarks/kernels.py --paths hidden --ns 16k >"$OUT/kernels_hidden.txt" 2>&1
stamp kernels_hidden
timeout 120 python3 benchmarks/rollout.py --device cuda --dtype bfloat16 --models 0.5b --batches 8 64 32x8 \
    --sides generate ours_step ours_forward --repeats 3 --new_tokens 64 >"$OUT/rollout.txt" 2>&1
stamp rollout
grep -E "passed|failed" "$OUT/tests.txt" | tail -1
for f in kernels_logits kernels_hidden rollout; do
    echo "### $f"
    tail -c 2500 "$OUT/$f.txt"
done
