#!/usr/bin/env bash
# The main job end to end on the synthetic default: set up, generate BraTS-layout data
# (20 cases at the real 240x240x155), prepare 2D slices into a dataset folder
# (data/prepared/demo), train the 2D UNet briefly, evaluate on the held-out cases, and say
# where everything is. Re-running reuses the data and resumes/continues the run.
# Environment: DEMO_CASES, DEMO_EPOCHS, DEMO_STEPS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
CLI=.venv/bin/unet-train
CASES=${DEMO_CASES:-20}
EPOCHS=${DEMO_EPOCHS:-5}
STEPS=${DEMO_STEPS:-40}
RAW=data/raw/MICCAI_BraTS_2019_Data_Training
DATA=data/prepared/demo
RUN=(--run-name demo --data "$DATA" --set "train.steps_per_epoch=$STEPS")

[ -d "$RAW" ] || $CLI synth --format brats --out "$RAW" --cases "$CASES" --seed 0
[ -f "$DATA/prepared.json" ] || $CLI prepare --format brats --src "$RAW" --model 2d --out "$DATA"
$CLI train --model 2d --epochs "$EPOCHS" "${RUN[@]}"
$CLI evaluate --model 2d "${RUN[@]}"
echo
echo "TensorBoard logs : runs/demo/tensorboard   (.venv/bin/tensorboard --logdir runs/demo/tensorboard --host 127.0.0.1)"
echo "Predictions      : runs/demo/evaluation/predictions/*.nii.gz (source geometry)"
echo "Metrics          : runs/demo/evaluation/per_case.csv, runs/demo/evaluation/summary.json"
echo "Validation       : runs/demo/validation.json (best checkpoint on the whole validation volumes)"
echo "Checkpoints      : runs/demo/checkpoints/{last,best}; history: runs/demo/history.csv"
