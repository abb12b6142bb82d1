#!/usr/bin/env bash
# Here (with registry access): download the wheels the GPU machine lacks into .whl/ (git-ignored),
# for CPython 3.12 on manylinux x86_64, exactly those in bench/gpu/wheels.txt, without their deps.
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-python3 -m pip}
rm -rf .whl && mkdir -p .whl
grep -v '^#' bench/gpu/wheels.txt | xargs $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl
count=$(ls .whl/*.whl | wc -l); wanted=$(grep -cv '^#' bench/gpu/wheels.txt)
[ "$count" -eq "$wanted" ] || { echo "got $count wheels for $wanted names"; exit 1; }
size=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "$count wheels, $((size / 1024)) KiB in .whl/"
[ "$size" -lt $((48 * 1024 * 1024)) ] || { echo "over the 48 MiB budget"; exit 1; }
