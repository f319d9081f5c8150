#!/usr/bin/env bash
# Sets up ./.venv with torch 2.14.1 and bsr_kernels (editable, C++ extension built against that
# torch) with its test and app extras. Used by the README's quick start and by CI. Safe to re-run.
# The package itself accepts torch>=2.11; the exact pin lives here (and so in CI) only.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q "setuptools>=64" wheel ninja
# No build isolation: the extension must be compiled against the torch installed above.
.venv/bin/pip install -q --no-build-isolation -e ".[test,app]"
.venv/bin/python -c "import bsr_kernels as b; bs = b.available_backends('cpu'); print('bsr_kernels', b.__version__, 'backends:', bs); assert 'cpp' in bs, 'the C++ extension did not build'"
