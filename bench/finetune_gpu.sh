#!/usr/bin/env bash
# One prepared GPU check (an H200 or any CUDA GPU), a few minutes: the finetune GPU tests, then the
# fine-tuning benchmark on CUDA. Installs nothing unless an import is missing.
#   bash bench/finetune_gpu.sh            (from the repository root; writes bench/results/finetune_gpu.json)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PARLEY_HOME="${PARLEY_HOME:-$(mktemp -d)}"
export PARLEY_TEST_HOME="${PARLEY_TEST_HOME:-$PARLEY_HOME}"

python - <<'PY' || pip install torch==2.13.0
import torch
assert torch.cuda.is_available(), "no CUDA"
PY
python -c "import finetune, bot" 2>/dev/null || pip install -e .
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true

echo "== GPU tests"
timeout 300 python -m pytest -q tests/gpu/test_finetune_gpu.py -p no:cacheprovider

if [ -f "${PARLEY_DATA:-/work/shared/data}/instruct/gsm8k_train.messages.jsonl" ]; then
  echo "== benchmark (CUDA)"
  timeout 420 python bench/finetune.py --device cuda --home "$PARLEY_HOME" \
    --rows 512 --eval-rows 64 --steps 30 --batch-size 16 --max-length 512 --lr 5e-4 \
    --gsm8k-rows 2000 --gsm8k-steps 150 --gsm8k-eval 128 --gen-batch 64 --gen-tokens 256 \
    --work /tmp/parley-bench-gpu --out bench/results/finetune_gpu.json
else
  echo "GSM8K data not found (set PARLEY_DATA): benchmark skipped"
fi
