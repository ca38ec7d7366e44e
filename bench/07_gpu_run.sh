[ "$1" = --cpu ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; } || exit 1
# Exercise 07 on a GPU, in one command (about 6-7 minutes on an H100 or H200; each step under its own timeout, at
# most 9.5 minutes in all): build the Llama-3.2-1B-shaped checkpoint, run inferlab's engine beside `transformers
# serve --continuous-batching` (and vLLM, SGLang, TGI where installed) over a sweep of offered loads, then
# inferlab's tuning walkthrough (prefix caching on and off, a chunk-size sweep). Charts (PNG), the table (markdown),
# every number (JSON) and the engines' logs land in $OUT.
#
#   bash bench/07_gpu_run.sh            # on the GPU machine, from the repo root; .whl/ carried (FastAPI, uvicorn,
#                                       # pydantic, openai and their dependencies: the first line installs them)
#   bash bench/07_gpu_run.sh --cpu      # here: the same steps on the CPU with a toy-sized checkpoint, tiny loads
#
# The first line installs the wheels of .whl/ (see bench/README.md) into /tmp/site; --cpu uses this machine's packages.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_run_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CKPT=/tmp/inferlab-1b
exec > >(tee "$OUT/run.log") 2>&1
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no NVIDIA GPU"

if [ "${1:-}" = --cpu ]; then
    CKPT=/tmp/inferlab-toy
    timeout 300 python3 bench/07_make_checkpoint.py "$CKPT" --small --device cpu --check || exit 1
    timeout 900 python3 bench/07_compare_engines.py --model "$CKPT" --device cpu --out "$OUT" --walkthrough \
        --engines inferlab,transformers,vllm --rates 2,inf --num-requests 6 --prompt-len 48 --max-tokens 8 \
        --seconds-per-point 2 --time-limit 30 --start-timeout 300 --agreement-tokens 8 \
        --system-prompt-len 192 --chunk-sizes 64,256 --walk-rate 4 --walk-requests 6
    exit $?
fi

timeout 90 python3 bench/07_make_checkpoint.py "$CKPT" --device cuda --check || exit 1
# Each step saves what it measured after every engine and every run: a step stopped by its timeout keeps its results.
# The comparison: four offered loads, ~8 s of arrivals each (at least 16 requests; 128 at once for inf), prompts of
# 512 tokens and answers of 128, $3 per GPU-hour for the cost column.
timeout 300 python3 bench/07_compare_engines.py --model "$CKPT" --device cuda --out "$OUT" \
    --engines inferlab,transformers,vllm,sglang,tgi --rates 4,16,64,inf --num-requests 128 --prompt-len 512 \
    --max-tokens 128 --seconds-per-point 8 --time-limit 40 --start-timeout 180 --gpu-hour-price 3.0
mv "$OUT/compare.json" "$OUT/compare_engines.json" 2>/dev/null
mv "$OUT/logs.tar.gz" "$OUT/logs_compare.tar.gz" 2>/dev/null
# The walkthrough: a 1536-token system prompt shared by every request, prefix caching on and off; then long prompts
# among decodes at three chunk sizes (--max-num-batched-tokens).
timeout 180 python3 bench/07_compare_engines.py --model "$CKPT" --device cuda --out "$OUT" --walkthrough \
    --no-compare --system-prompt-len 1536 --chunk-sizes 256,1024,4096 --walk-rate 8 --walk-requests 48 \
    --time-limit 20 --start-timeout 120
mv "$OUT/compare.json" "$OUT/walkthrough.json" 2>/dev/null
mv "$OUT/logs.tar.gz" "$OUT/logs_walkthrough.tar.gz" 2>/dev/null
# at most 8 files come back from $OUT: the two log archives travel as one
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs_compare.tar.gz logs_walkthrough.tar.gz && rm -f "$OUT"/logs_*.tar.gz
ls -la "$OUT"
date -u
