#!/usr/bin/env bash
# Everything GPU-side checked by one command, time-boxed stage by stage (launch/gpu_check.py says what
# runs; the README's "GPU check" section how to carry the wheel kit):
#   bash launch/gpu_check.sh [OUTDIR]          on a GPU machine (OUTDIR: default $OUT, else runs/gpu_check)
#   bash launch/gpu_check.sh --cpu [OUTDIR]    the dry run at tiny shapes on the CPU (what CI runs)
# PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" launch/gpu_check.py "$@"
