#!/usr/bin/env bash
# Run on a machine with network, before a GPU session: downloads into .whl/ (git-ignored) the wheels
# that the GPU check needs and the GPU machine's image lacks (benchmarks/gpu_check/wheels.txt): cp312
# manylinux x86-64 wheels, --only-binary, --no-deps (the list is the whole closure); the few pure-Python
# projects published only as source distributions are built into py3 wheels here. Fails, leaving
# .whl/ as it was, when a wheel is missing, unlisted or does not install on CPython 3.12 / x86-64,
# or when the wheels would take more than 60 MiB (the working tree travels with them, 64 MiB in all).
#
#   bash benchmarks/gpu_check/prepare.sh [DEST]     # DEST: default .whl/ in the repository root
#
# PYTHON (default python3) is any Python with pip; it need not be 3.12.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${PYTHON:-python3}
dest=${1:-$root/.whl}

mapfile -t binary < <("$python" "$here/wheels.py" binary)
mapfile -t sdist < <("$python" "$here/wheels.py" sdist)
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT

echo "prepare: downloading ${#binary[@]} wheels for CPython 3.12 / manylinux x86-64 into $dest"
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$staging" "${binary[@]}"
for requirement in "${sdist[@]}"; do
    echo "prepare: building $requirement (pure Python, source distribution only) into a wheel"
    "$python" -m pip wheel --quiet --no-deps --no-binary="${requirement%%==*}" -w "$staging" "$requirement"
done

if ! "$python" "$here/wheels.py" check "$staging"; then
    echo "prepare: FAILED: $dest left as it was" >&2
    exit 1
fi
rm -rf "$dest"
mv "$staging" "$dest"
trap - EXIT
echo "prepare: done. On the GPU machine, from the repository root (with .whl/ carried along):"
echo "    bash benchmarks/gpu_check/run.sh OUT_DIR"
