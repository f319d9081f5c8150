#!/usr/bin/env bash
# Runs the tests against the oldest torch the package accepts: torch 2.11.0 with its triton 3.6,
# numpy < 2.4 (triton 3.6's interpreter cannot run with a newer one) and timm 1.0.29, the versions
# of the lent GPU machines' image. CI tests the pinned torch only (scripts/install.sh); run this
# before relying on a GPU lease, where a torch-version difference costs device time to find.
#
#     bash scripts/test_oldest_torch.sh                 # the whole suite, as CI runs it
#     bash scripts/test_oldest_torch.sh tests/test_modes.py -q -k compile
#
# The venv (.venv-oldest-torch, reused by later runs; VENV=... picks another) and a copy of the
# working tree (tracked and untracked files that git does not ignore, in a temporary folder, where
# the extension is built against torch 2.11) are its own: ./.venv and its extension stay as they
# are. PyPI's torch 2.11.0 is a CUDA build: about 5 GB with its nvidia packages.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON=${PYTHON:-python3}
VENV=$(realpath -m "${VENV:-.venv-oldest-torch}")
[ $# -gt 0 ] || set -- tests -q

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# setuptools 77-81: torch 2.11 takes < 82, and the editable finder of the venv's own setuptools
# (65) resolved a module missing from a copy on PYTHONPATH (bsr_kernels.ops._C) in this tree
# instead, so test_unbuilt_extension_is_called_not_built failed here (torch 2.14 pulls >= 77)
"$VENV/bin/pip" install -q torch==2.11.0 "numpy<2.4" timm==1.0.29 "setuptools>=77.0.3,<82" \
    wheel ninja
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$WORK"
cd "$WORK"
# the installed torch, numpy and timm satisfy the package's ranges, so pip keeps them
"$VENV/bin/pip" install -q --no-build-isolation -e ".[test,app]"
"$VENV/bin/python" -c "import torch, triton, numpy, timm; print('torch', torch.__version__, \
'triton', triton.__version__, 'numpy', numpy.__version__, 'timm', timm.__version__)"
"$VENV/bin/python" -m pytest "$@"
