#!/usr/bin/env bash
# benchmarks/gpu.py on this workplace's lent GPU machine (the `device` tool; its kind nvidia-h200).
#
# That machine's image has torch and most of what we import, but transformers 5.17 (we need >=5.23,<5.25) and no
# mistral_common (whose wheel holds the Mistral tokenizer the benchmark uses), and it reaches no package registry
# (/work/.library/device/KINDS.md). So the missing wheels, and that tokenizer file, travel with the checkout:
#
#   here, once (needs PyPI):  bash benchmarks/gpu_device.sh fetch              -> .whl/ (git-ignored)
#   there, through `device`:  bash benchmarks/gpu_device.sh run [gpu.py options]    with carry [".whl"]
#
# `run` installs the carried wheels into /tmp/site (the image's own environment is left alone), puts /tmp/site and
# this checkout (our package and sdk/, not installed) first on the path, and runs gpu.py offline and unbuffered,
# its output also written to $OUT/gpu.log when $OUT is set (the device tool brings that file back). gpu.py prints
# each figure as soon as it has it. `fetch` takes PYTHON_VERSION (default 3.12, the machine's python3).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(transformers==5.24.0 regex==2026.5.9)
# only the tokenizer file of mistral_common: installed without its own needs (pydantic, absent there), it would
# make transformers' processors fail to import its tokenizer backend
TOKENIZER_FROM=mistral_common==1.13.1

case "${1:-}" in
fetch)
    rm -rf .whl && mkdir -p .whl
    for wheel in "${WHEELS[@]}"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .whl "$wheel"
    done
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl/mistral "$TOKENIZER_FROM"
    python3 -m zipfile -e .whl/mistral/*.whl .whl/mistral/unpacked
    mv .whl/mistral/unpacked/mistral_common/data/tokenizer.model.v1 .whl/tokenizer.model.v1
    rm -rf .whl/mistral
    ls -l .whl
    ;;
run)
    shift
    if ! ls .whl/*.whl >/dev/null 2>&1 || [ ! -f .whl/tokenizer.model.v1 ]; then
        echo "no wheels or tokenizer in .whl/: run 'bash $0 fetch' where PyPI is reachable, and carry .whl" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD:$PWD/sdk${PYTHONPATH:+:$PYTHONPATH}"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 MISTRAL_TOKENIZER_MODEL="$PWD/.whl/tokenizer.model.v1"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    python3 benchmarks/gpu.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu.log"
    ;;
*)
    echo "usage: bash $0 fetch | run [gpu.py options]" >&2
    exit 2
    ;;
esac
