#!/usr/bin/env bash
# End to end on an ImageNet-shaped LMDB: images/s of whole train.py epochs (reading, decoding, augmenting,
# training, evaluating) in prune mode, per trainer and --decode path.
#   bash bench/e2e_lmdb.sh [DEVICE] [ARCH] [TRAIN_IMAGES] [WORKERS]      e.g. cuda ResNet50 2560 12
# Prints one line per run: the epoch's seconds (metrics.csv) and (train + val images) / seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cuda} ARCH=${2:-ResNet50} N=${3:-2560} WORKERS=${4:-8}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
$PY - "$WORK" "$N" <<'PYEOF'
import os, sys
sys.path.insert(0, os.getcwd())
from bench.bench_data import make_images
from data.image_folder import scan_image_folder
from data.lmdb_writer import write_lmdb
work, n = sys.argv[1], int(sys.argv[2])
make_images(os.path.join(work, "train"), count=n, size=(320, 256), classes=10)
make_images(os.path.join(work, "val"), count=max(64, n // 10), size=(320, 256), classes=10)
for split in ("train", "val"):
    write_lmdb(scan_image_folder(os.path.join(work, split), fix="bench"), os.path.join(work, f"{split}.lmdb"),
               progress=False)
PYEOF
COMMON=(--dataset ImageNet --data-dir "$WORK" --num-classes 10 --arch "$ARCH" --batch-size 64 --test-batch-size 128
        --num-workers "$WORKERS" --device "$DEVICE" --no-progress --epochs 1 --result-dir "$WORK/runs")
$PY train.py "${COMMON[@]}" --exp-mode pretrain --decode cpu > "$WORK/pretrain.log" 2>&1 || { tail -5 "$WORK/pretrain.log"; exit 1; }
SOURCE=$(find "$WORK/runs" -path "*pretrain*" -name checkpoint.pth.tar | head -1)
VAL=$($PY -c "import sys; print(max(64, int(sys.argv[1]) // 10))" "$N")
# HYDRA with both decoders, then BiP and WoodFisher (one OBS event at epoch 0, then training) with the GPU's
for run in "base cpu" "base gpu" "bilevel gpu" "woodfisher gpu"; do
    set -- $run
    [ "$DEVICE" = cuda ] || set -- "$1" cpu  # --decode gpu needs CUDA
    name="$1-$2"
    if ! $PY train.py "${COMMON[@]}" --exp-mode prune --trainer "$1" --k 0.05 --source-net "$SOURCE" --decode "$2" \
            --exp-name "$name" > "$WORK/$name.log" 2>&1; then
        echo "$name: failed"; tail -3 "$WORK/$name.log"; continue
    fi
    seconds=$($PY -c "import csv, glob, sys; rows = list(csv.DictReader(open(glob.glob(sys.argv[1] + '/**/metrics.csv', recursive=True)[0]))); print(rows[-1]['seconds'])" "$WORK/runs/$name")
    $PY -c "import sys; s, n, v = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]); print(f'{sys.argv[4]:<16} epoch {s:7.2f} s  {(n + v) / s:8.0f} images/s (train {n} + val {v})')" "$seconds" "$N" "$VAL" "$name"
done
