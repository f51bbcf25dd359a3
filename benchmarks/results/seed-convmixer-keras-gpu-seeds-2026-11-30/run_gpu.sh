#!/bin/bash
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; date -u
python3 -c "import torch,timm,torchvision;print('torch',torch.__version__,'timm',timm.__version__)"
python3 carry/unpack.py /tmp/d1 /tmp/d2 || exit 1
mkdir -p /tmp/runs /tmp/logs
run() { name=$1; data=$2; cache=$3; shift 3
  MIXLAB_DATA=$data MIXLAB_CACHE=$cache timeout ${RUN_LIMIT:-470} python3 -m mixlab train --model convmixer_256_8 \
    --recipe seed-convmixer-keras --device cuda --precision fp32 --out /tmp/runs/$name "$@" > /tmp/logs/$name.log 2>&1
  echo "$name exit $? $(date -u +%T)"; }
for s in 1 2 3 4; do run A$s /tmp/d1 /tmp/c1 --seed $s & done
for s in 1 2 3; do run B$s /tmp/d1 /tmp/c1 --seed $s --set shuffle_buffer=1280 & done
for s in 1 2; do run C$s /tmp/d1 /tmp/c1 --seed $s --set optimizer.name=adamw & done
for s in 1 2 3; do run D$s /tmp/d2 /tmp/c2 --seed $s & done
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; tail -n 3 /tmp/logs/A1.log
wait
date -u
python3 carry/collect.py /tmp/runs | tee $OUT/summary.txt
head -n 25 /tmp/logs/A1.log; tail -n 8 /tmp/logs/A1.log
tar czf $OUT/runs.tgz --exclude='*.safetensors' --exclude='*.pt' -C /tmp runs logs
