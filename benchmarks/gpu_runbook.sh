#!/bin/bash
# The GPU checks of benchmarks/README.md as one command for a short lease (~10 minutes on an H200 with every part, ~5 with
# GEOMETRY=0 KERNELS=0), each step
# under its own time limit, its output in $OUT (or ./gpu_out) as it goes, so a step that runs long costs only
# itself. Wheels in .whl/ (TRL 1.16 and what the card's image lacks: see benchmarks/README.md) are installed
# first into /tmp/site (.whl/tf/: transformers and what it needs, into /tmp/site_tf if they import together).
# GEOMETRY=0, KERNELS=0 or LOOPS=0 leaves out the launch-geometry sweep, the side-by-side kernel tables or the
# loops' commands on the embedded task (a few steps each, bf16 autocast; ~3-5 minutes, a first SFT start included).
#
#     bash benchmarks/gpu_runbook.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
stamp() { echo "== $1 at +$(($(date +%s) - T0)) s" | tee -a "$OUT/steps.txt"; }
export PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$OUT/pip.txt" 2>&1
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
# .whl/tf: the transformers release CI runs and what it needs, used only if it imports (else the image's)
if compgen -G ".whl/tf/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_tf \
        .whl/tf/*.whl >>"$OUT/pip.txt" 2>&1
    PYTHONPATH=/tmp/site_tf:$PYTHONPATH python3 -c "import transformers, trl, datasets; transformers.AutoModelForCausalLM" \
        >>"$OUT/pip.txt" 2>&1 && export PYTHONPATH=/tmp/site_tf:$PYTHONPATH
fi
{
    nvidia-smi --query-gpu=name,driver_version --format=csv
    python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
    python3 -c "import trl; print('trl', trl.__version__)"
} >"$OUT/env.txt" 2>&1
stamp env
timeout 150 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_kernels_logits.py tests/test_kernels_hidden.py \
    tests/test_kernels_cuda_compile.py tests/test_decode.py >"$OUT/tests.txt" 2>&1
stamp tests
if [ "${GEOMETRY:-1}" = 1 ]; then
    timeout 170 python3 benchmarks/geometry.py >"$OUT/geometry.txt" 2>&1
    stamp geometry
fi
if [ "${KERNELS:-1}" = 1 ]; then
    timeout 120 python3 benchmarks/kernels.py --paths logits --ns 16k --skip compiled >"$OUT/kernels_logits.txt" 2>&1
    stamp kernels_logits
    timeout 60 python3 benchmarks/kernels.py --paths hidden --ns 16k >"$OUT/kernels_hidden.txt" 2>&1
    stamp kernels_hidden
fi
if [ "${LOOPS:-1}" = 1 ]; then
    # every loop's command on the embedded task for a few steps, on the GPU with bf16 autocast (the loops'
    # default there; never run on a GPU before session 16's runbook): exit status, seconds, last log line
    for cmd in "sft --max_steps 20" "rm --max_steps 10" "dpo --max_steps 10" "kto --max_steps 10" \
        "cpo --max_steps 10" "orpo --max_steps 10" "grpo --max_steps 3" "rloo --max_steps 3" \
        "online_dpo --max_steps 3" "ppo --total_episodes 64" "prm --max_steps 10"; do
        name=${cmd%% *}
        start=$(date +%s)
        timeout 150 python3 -m posttrain.cli $cmd --output_dir "/tmp/gpu_loops/$name" >"/tmp/gpu_loops_$name.log" 2>&1
        rc=$?
        echo "## $name: exit $rc, $(($(date +%s) - start)) s" >>"$OUT/loops.txt"
        if [ $rc = 0 ]; then  # the last metrics lines (after the progress bar's carriage returns)
            tr '\r' '\n' <"/tmp/gpu_loops_$name.log" | grep -oE "(eval )?step [0-9].*" | tail -n 2 >>"$OUT/loops.txt"
        else
            tr '\r' '\n' <"/tmp/gpu_loops_$name.log" | grep -v '^\s*$' | tail -n 25 >>"$OUT/loops.txt"
        fi
    done
    stamp loops
fi
timeout 120 python3 benchmarks/rollout.py --device cuda --dtype bfloat16 --models 0.5b --batches 8 64 32x8 \
    --sides generate ours_step ours_forward --repeats 3 --new_tokens 64 >"$OUT/rollout.txt" 2>&1
stamp rollout
grep -E "passed|failed" "$OUT/tests.txt" | tail -1
grep "^## " "$OUT/loops.txt" 2>/dev/null
for f in geometry kernels_logits kernels_hidden rollout; do
    [ -f "$OUT/$f.txt" ] && echo "### $f" && tail -c 1500 "$OUT/$f.txt"
done
