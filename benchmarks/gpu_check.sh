#!/usr/bin/env bash
# GPU check (issue 21): peftlab's core paths in bf16 on one GPU (classification LoRA, SmolLM2 SFT with packing, merge,
# generation), tokens/s and MFU against the GPU's measured bf16 GEMM peak. The measurements: benchmarks/gpu_check.py.
#
# 1. Here, once per checkout (the carry folder is ignored by git, so a clean clone lacks it; needs ../shared and pip):
#      grep -qx '/.gpu_carry/' .git/info/exclude || echo '/.gpu_carry/' >> .git/info/exclude
#      bash benchmarks/gpu_check.sh --prepare        # -> .gpu_carry/ (~53 MiB): wheels, MiniLM fp16, SmolLM2 config+tokenizer, data
# 2. On the device machine, the device tool's run (about 3-5 min of it; results come back from $OUT):
#      run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_carry"], timeout_s=600)
#    -> $OUT/gpu_check.md (the table, also printed last), gpu_check.json, gpu_check.log, peftlab-{cls,sft}.log, nvidia-smi.txt
# 3. Here, the same code paths on the CPU with tiny sizes (~4 min on 2 shared cores):
#      bash benchmarks/gpu_check.sh --cpu            # -> $OUT or /tmp/gpu_check_cpu: gpu_check.{md,json}; runs in $WORK or /tmp/gpu_check_cpu_work
# Any further arguments go to gpu_check.py (e.g. --budget 300, --only cls,sft, --bare, --tiny).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
case "${1:-}" in
  --prepare) exec python3 benchmarks/gpu_check.py --prepare ;;
  --cpu) shift; OUT=${OUT:-/tmp/gpu_check_cpu}; WORK=${WORK:-/tmp/gpu_check_cpu_work}; mkdir -p "$OUT" "$WORK"
         exec python3 benchmarks/gpu_check.py --cpu --tiny --out "$OUT" --work "$WORK" "$@" ;;
esac
: "${OUT:?set OUT (the device tool sets it)}"
[ -d .gpu_carry/whl ] || { echo "no .gpu_carry: run 'bash benchmarks/gpu_check.sh --prepare' here and carry .gpu_carry"; exit 2; }
# what the image lacks (datasets, evaluate, rouge_score and their pure-Python needs), installed beside it, not over it
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_carry/whl/*.whl \
  || echo "gpu_check: carried wheels did not install; peftlab paths will fall back to bare loops"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv 2>&1
timeout 540 python3 benchmarks/gpu_check.py --out "$OUT" --budget 420 "$@" 2>&1 | tee "$OUT/gpu_check.log"
