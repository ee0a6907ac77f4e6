#!/usr/bin/env bash
# The GPU check, one command (benchmarks/gpu_check/): on a GPU machine, from anywhere,
#
#   bash benchmarks/gpu_check/run.sh OUT_DIR              # every stage at real sizes (about 8 minutes on one H100)
#   bash benchmarks/gpu_check/run.sh --cpu-smoke OUT_DIR  # toy sizes on CPU: what CI runs
#   bash benchmarks/gpu_check/run.sh --dry-run            # the stages, what each runs, the time each is allowed
#
# Writes OUT_DIR/gpu_check.md (the device line, then one table), gpu_check.json and gpu_check.log.
# Before a GPU run, wheels the machine lacks (prepare.sh put them in .whl/) are installed with
# `pip install --no-index --no-deps --target` into GPU_CHECK_SITE (default /tmp/gpu_check_site) and
# put on PYTHONPATH; a machine that already has megatron-core, lm-eval and their needs (NVIDIA's
# PyTorch container + pip install -e ".[eval]") needs no .whl/. The exit status is 0 when every stage
# passed. The report names the git commit; where the tree has no .git, set GPU_CHECK_COMMIT. Other
# options (--stages, --work, --launch): python -m gpu_check --help (PYTHONPATH=benchmarks).
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-python3}
site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}

install=yes
for arg in "$@"; do
    case $arg in --cpu-smoke|--dry-run|-h|--help) install=no ;; esac
done
wheels=("$root"/.whl/*.whl)
if [ "$install" = yes ] && [ -e "${wheels[0]}" ]; then
    began=$(date +%s%N)
    if output=$("$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "${wheels[@]}" 2>&1); then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        seconds=$(( ($(date +%s%N) - began) / 1000000000 ))
        export GPU_CHECK_INSTALL="installed ${#wheels[@]} wheels from .whl/ in $seconds s"
    else
        # Recorded, not fatal: stage a then says what does not import, and the stages that can run do.
        export GPU_CHECK_INSTALL="installing .whl/ FAILED: $(echo "$output" | grep -v '^\s*$' | tail -n 1)"
    fi
    echo "gpu_check: $GPU_CHECK_INSTALL"
fi
export PYTHONPATH="$root:$root/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m gpu_check "$@"
