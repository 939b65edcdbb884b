#!/usr/bin/env bash
# Download, on a machine with network, the wheels that benchmarks/gpu_check.sh installs on a GPU
# machine without one: benchmarks/gpu-wheels.txt (CPython 3.12, manylinux x86_64 or pure Python)
# into benchmarks/wheels/ (git-ignored), then faiss-cpu if the whole carry still fits under
# CARRY_LIMIT_MB (default 64: the checkout + wheels the GPU machine receives).
#   bash benchmarks/fetch_gpu_wheels.sh            # PY_VERSION=3.12 PLATFORM=x86_64 by default
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
ABI="cp${PY_VERSION/./}"
LIMIT_MB=${CARRY_LIMIT_MB:-64}
OUT=benchmarks/wheels
mkdir -p "$OUT"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)
# --no-deps: the list is the whole tree already (and must not pull torch or CUDA wheels).
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp --abi "$ABI" --abi abi3 --abi none "${platforms[@]}" \
    -d "$OUT" -r benchmarks/gpu-wheels.txt
checkout_bytes=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
wheels_bytes=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
echo "checkout $((checkout_bytes / 1048576)) MiB + wheels $((wheels_bytes / 1048576)) MiB"
# faiss-gpu (~135 MB) cannot travel; a CPU faiss lets the index tests and stages run there.
tmp=$(mktemp -d)
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp --abi "$ABI" --abi abi3 "${platforms[@]}" -d "$tmp" "faiss-cpu>=1.10"
faiss_bytes=$(du -cb "$tmp"/*.whl | tail -1 | cut -f1)
total=$((checkout_bytes + wheels_bytes + faiss_bytes))
if (( total <= LIMIT_MB * 1048576 )); then
    mv "$tmp"/*.whl "$OUT"/
    echo "faiss-cpu carried ($((faiss_bytes / 1048576)) MiB)"
else
    echo "faiss-cpu NOT carried: $((faiss_bytes / 1048576)) MiB would make $((total / 1048576)) MiB > ${LIMIT_MB} MiB"
fi
rm -rf "$tmp"
wheels_bytes=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
echo "total to carry: $(( (checkout_bytes + wheels_bytes) / 1048576 )) MiB ($(( checkout_bytes + wheels_bytes )) bytes; limit ${LIMIT_MB} MiB)"
ls -S "$OUT"
