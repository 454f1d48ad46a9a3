#!/usr/bin/env bash
# The checks only a CUDA machine can run, in one go (each step bounded so one hang cannot eat the rest):
# tests/test_cuda.py, a GPU run of train.py, and the GPU figures of the README (bench_amp with ResNet-50 at
# 224x224 and MobileNetV1's, the OBS event of each, the device data path). Uses the python on PATH (PYTHON to override).
# Output: the console, plus $OUT (default ./gpu_checks) with one log per step.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-./gpu_checks}
mkdir -p "$OUT"
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "== $name (at most ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "-- $name: exit $?"
    tail -n 30 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
# The issue's figures first (the sync-free step, HYDRA/BiP against the dense step on ResNet-50 and MobileNetV1, the OBS
# event of each), the checks already measured once last, so that a short lease still yields the new figures.
step test_cuda 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -m "slow or not slow"
step bench_amp_resnet50 150 $PY bench/bench_amp.py --arch ResNet50 --image-size 224 --classes 1000 --batch-size 64 \
    --steps 5 --device cuda
step bench_amp_mobilenet 120 $PY bench/bench_amp.py --arch mobilenet --image-size 224 --classes 1000 --batch-size 64 \
    --steps 5 --device cuda
step bench_event_resnet50 100 $PY bench/bench_event.py --cases resnet50 --device cuda --repeats 1
step bench_event_mobilenet 120 $PY bench/bench_event.py --cases mobilenet --device cuda --repeats 1
step profile_step_resnet50 120 $PY bench/profile_step.py --device cuda --out "$OUT/profile_step.md"
step bench_step_resnet18 150 $PY bench/bench_step.py --device cuda --steps 9
step quickstart_pretrain_gpu 50 $PY train.py --configs configs/Digits/pretrain.yml --epochs 2 --no-progress \
    --device cuda --amp bf16 --channels-last --result-dir "$OUT/runs"
step bench_decode_gpu 60 $PY bench/bench_decode.py --source folder --images 512 --workers 4 --device cuda
