#!/usr/bin/env bash
# The wheels a lent GPU machine's image lacks, for launch/device_bench.sh there: the image has
# Python 3.12 with jax, flax, optax, orbax-checkpoint, einops, torch, timm, scikit-image and
# more, but not grain (and its array_record, portpicker), ml_collections, clu,
# segment_anything, dp_accounting (and its dm_tree), pydicom or pycocotools, and nothing can be
# fetched on it. Run this here, where pip reaches a registry; it writes .whl/ (ignored by
# git). Then carry .whl to the device and run launch/device_bench.sh there: it installs
# .whl/*.whl into /tmp/site first.
#   launch/device_wheels.sh [grain==X ...]   (default: the versions pip picks today)
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=("$@")
[ ${#PACKAGES[@]} -gt 0 ] || PACKAGES=(grain array_record portpicker ml_collections clu
  segment_anything dp_accounting dm_tree pydicom pycocotools)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl "${PACKAGES[@]}"
ls -l .whl
