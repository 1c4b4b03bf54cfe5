#!/usr/bin/env bash
# The prepared run for a GPU machine: one command that reports the environment, times posttrain beside TRL in bf16
# (bench.py --device cuda, the gpu350m workloads), and then runs the end-to-end GPU checks (gpu_checks.py: every
# method family in bf16, FSDP2 through the shipped launch config with a sharded resume, asynchronous GRPO) at the
# same time as the plugins' training tests on the GPU. Everything lands in $OUT (default ./gpu-out).
#
#   bash benchmarks/gpu_run.sh                 # on a machine with CUDA, torch and the project's dependencies
#
# A machine without network access installs what it lacks from wheels in .whl/ first (pip download them elsewhere:
# transformers, datasets, trl, dill, multiprocess, fsspec, pluggy and posttrain's own wheels from `nox -s build`).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 POSTTRAIN_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
{
    nvidia-smi
    python3 -c "import torch, transformers, datasets, trl, accelerate, posttrain as p; print({m.__name__: m.__version__ for m in (torch, transformers, datasets, trl, accelerate, p)})"
    python3 -m posttrain env
    python3 -m posttrain list
} >"$OUT/env.txt" 2>&1
echo "environment: $(tail -1 "$OUT/env.txt")"

echo "bench (bf16, posttrain and TRL): $(date +%T)"
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench.py --device cuda --sizes gpu350m --methods "${BENCH_METHODS:-sft,dpo,grpo}" \
    --runners posttrain,trl --no-best --startup-repeats 3 --run-timeout 150 --tag gpu350m --out "$OUT" >"$OUT/bench.log" 2>&1
echo "bench exit $?"
grep -E "^gpu350m|failed|Error" "$OUT/bench.log" | head -20

echo "checks and training tests on the GPU: $(date +%T)"
timeout "${CHECKS_TIMEOUT:-200}" python3 benchmarks/gpu_checks.py --out "$OUT" --timeout 180 >"$OUT/checks.log" 2>&1 &
timeout "${TESTS_TIMEOUT:-200}" python3 -m pytest -q -n 6 plugins/*/tests/test_train.py >"$OUT/tests.log" 2>&1
echo "tests exit $?"
wait
echo "checks: $(tail -1 "$OUT/checks.log")"
tail -15 "$OUT/tests.log"
date +%T
