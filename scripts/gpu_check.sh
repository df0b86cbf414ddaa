#!/usr/bin/env bash
# The CUDA checks in one go, for a lent GPU machine whose python3 already holds a CUDA PyTorch:
# the opt-in GPU tests, then the benchmarks behind the README's CUDA figures. Logs go to $OUT
# (or out/). What that machine's image lacks travels as wheels in .whl/ (git-ignored): fetch them
# here first with `bash scripts/gpu_check.sh --fetch`, then carry .whl there.
#
#   bash scripts/gpu_check.sh --fetch          (here: the wheels, into .whl/)
#   bash scripts/gpu_check.sh tests 7b         (there: pytest -m gpu, the Mistral 7B bench)
#   bash scripts/gpu_check.sh quantized        (there: bfloat16, 4-bit and FP8 folders of a
#                                               0.85B shape: eager, compiled, FP8 products)
#
# Each part stops its steps at their time limits; tests + 7b and quantized each fit one call of
# ten minutes, not both one session's 15 minutes of device time: pick one per session.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch" ]; then
    python3 -m pip download -q --no-deps -d .whl simple-parsing docstring-parser
    ls .whl
    exit 0
fi
parts=" $* "
out=${OUT:-out}
mkdir -p "$out" .gpu
export PYTHONPATH="$PWD:$PWD/.gpu/site" PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target .gpu/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee -a "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: one logged step, stopped at its time limit
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$out/summary.txt"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "   exit $?" | tee -a "$out/summary.txt"
    tail -n 12 "$out/$name.log"
}

bench="python3 -m mistral bench --device cuda --dtype bfloat16"
if [[ $parts == *" tests "* ]]; then
    step tests 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
fi
if [[ $parts == *" 7b "* ]]; then
    step bench-7b 300 $bench --config mistral-7b-v0.1 --prompt-len 2048 --gen-len 128 \
        --repeats 3 --compile --json "$out/bench-7b.json"
fi
[[ $parts == *" quantized "* ]] || exit 0

# A 0.85B shape saved in bfloat16, at 4 bits (mlx-lm's codes) and in FP8 (blocks of 128): the
# quantized layers' eager, compiled and FP8-product speeds against bfloat16's.
rm -rf .gpu/bf16 .gpu/q4 .gpu/fp8  # a warm machine keeps them from an earlier call
step folders 150 python3 - <<'EOF'
import json, pathlib
from mistral.args import ModelArgs
from mistral.checkpoint import write_checkpoint
from mistral.quant import Quantization
from mistral.weights import random_weights
from tests.test_fp8 import fp8_folder

shape = {"dim": 2048, "n_layers": 16, "head_dim": 128, "hidden_dim": 5632, "n_heads": 16,
         "n_kv_heads": 4, "norm_eps": 1e-05, "vocab_size": 32000, "rope_theta": 1e6}
args = ModelArgs.from_params(shape)
weights = random_weights(args, seed=0, dtype="bfloat16")
root = pathlib.Path(".gpu")
write_checkpoint(root / "bf16", "mistral", args, weights)
write_checkpoint(root / "q4", "mlx", args, weights, quantize=Quantization(4, 64))
fp8_folder(root / "fp8", args, 128, weights)
print(json.dumps(sorted(str(p) for p in root.iterdir())))
EOF
small="--prompt-len 512 --gen-len 64 --repeats 2"
for f in bf16 q4 fp8; do
    step "bench-$f" 60 $bench --model ".gpu/$f" $small
done
step bench-q4-compiled 90 $bench --model .gpu/q4 $small --compile
step bench-fp8-scaled 90 $bench --model .gpu/fp8 $small --fp8 scaled
