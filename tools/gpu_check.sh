#!/usr/bin/env bash
# The GPU checks in one go, in under 8 minutes on one GPU (docs/gpu.md; the timeouts add up to 460 s): the
# cuda-marked tests, then bench.py's lockstep against transformers + PEFT + bitsandbytes and TRL on a random-weight
# model of Qwen2.5-1.5B's shapes, so no weights travel and nothing is downloaded, then ours again with the decode step
# compiled. Wheels in .whl/ (bitsandbytes, trl, where the machine lacks them) are installed first. Logs go to $OUT
# (default /tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, bitsandbytes, trl
print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__,
      '| bitsandbytes', bitsandbytes.__version__, '| trl', trl.__version__)"; } 2>&1 | tee "$OUT/versions.txt"
timeout 120 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_model.py tests/test_quant.py \
  tests/test_train.py 2>&1 | tee "$OUT/pytest_cuda.log"
timeout 50 python3 tools/random_model.py /tmp/qwen1.5b-random 2>&1 | tail -1
timeout 170 python3 tools/bench.py --model /tmp/qwen1.5b-random --data tests/data/gsm8k_train_head300.jsonl \
  --steps 6 --rounds 1 --gen_sweep 1,16,64 --gen_batch 64 --eval_problems 128 --rl_steps 1 \
  2>"$OUT/bench.err" | tee "$OUT/bench.log"
# the static decode step compiled (CUDA graphs), ours alone: the same generation and eval as above
timeout 120 python3 tools/bench.py --model /tmp/qwen1.5b-random --data tests/data/gsm8k_train_head300.jsonl \
  --steps 0 --rounds 1 --gen_batch 64 --eval_problems 128 --no_peer --compile 2>"$OUT/bench_compile.err" \
  | tee "$OUT/bench_compile.log"
