#!/usr/bin/env bash
# AdapterHub interop tests (tests/adapterhub/): fastpeft against AdapterHub's `adapters` 1.3.0,
# which needs transformers ~=4.57.6 while fastpeft's own environment has transformers 5. This
# builds a separate virtual environment (.venv-adapters, or $FASTPEFT_ADAPTERS_VENV) and runs
# those tests in it, with the bottleneck layer and placement tests (so placement is checked on
# transformers 4.57 as well as 5); extra arguments go to pytest. Re-running reuses the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${FASTPEFT_ADAPTERS_VENV:-.venv-adapters}"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install --quiet --upgrade pip
# fastpeft's runtime dependencies (torch, triton, safetensors, numpy) come with these pins.
python -m pip install --quiet torch==2.13.0 triton transformers==4.57.6 adapters==1.3.0 "pytest>=7" "pytest-timeout>=2"
# fastpeft itself: no dependencies (pip would upgrade transformers to fastpeft's test pin
# otherwise) and no CUDA extension (the interop tests do not use it; nvcc takes minutes).
python -m pip install --quiet --no-deps -e . -Ccmake.define.FASTPEFT_CUDA=OFF
python -c "import adapters, transformers; assert transformers.__version__ == '4.57.6', transformers.__version__"

python -m pytest -q -p no:randomly tests/adapterhub tests/methods/bottleneck/test_layer.py tests/methods/bottleneck/test_model.py "$@"
