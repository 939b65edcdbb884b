#!/usr/bin/env bash
# The one-call GPU check for a fresh single-GPU Linux machine with python3 + a CUDA build of
# torch and torchvision and NO network (see benchmarks/README.md):
#   bash benchmarks/gpu_check.sh [--out DIR/gpu_check.json] [gpu_check.py options]
# 1. installs clipforge from this checkout and the pure-Python / cp312 wheels carried beside it
#    in benchmarks/wheels/ (nothing is downloaded); CLIPFORGE_GPU_CHECK_SKIP_INSTALL=1 skips it;
# 2. runs benchmarks/gpu_check.py under an outer timeout (GPU_CHECK_TIMEOUT_S, default 470 s;
#    the script's own budget, --budget-s, defaults to 420 s and is checked between stages).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-python3}
WHEELS=benchmarks/wheels
elapsed() { echo "[$(( $(date +%s) - start )) s]"; }

if [[ -z "${CLIPFORGE_GPU_CHECK_SKIP_INSTALL:-}" ]]; then
    echo "$(elapsed) install: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)')"
    # A venv that sees the system's torch (--system-site-packages): installing into it needs
    # no --break-system-packages on an externally managed python. Without ensurepip, fall back
    # to the python itself.
    VENV=${GPU_CHECK_VENV:-/tmp/clipforge-gpu-check-venv}
    # (A python that is itself a venv's gives a venv that does not see that venv's torch: then
    # install into it directly.)
    if "$PY" -m venv --system-site-packages "$VENV" >/dev/null 2>&1 \
        && "$VENV/bin/python" -m pip --version >/dev/null 2>&1 \
        && "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
        PY=$VENV/bin/python
    else
        echo "$(elapsed) no usable venv (ensurepip missing, or torch not seen): into $PY itself"
        export PIP_BREAK_SYSTEM_PACKAGES=1
    fi
    pip_install() { "$PY" -m pip install --no-index --disable-pip-version-check -q "$@"; }
    # Only the wheels whose distribution is not installed yet (never replace the machine's
    # numpy/pillow/torch), each without dependency resolution: the list is the whole tree.
    missing=$("$PY" - "$WHEELS" <<'PYEOF'
import sys, re
from importlib.metadata import distribution, PackageNotFoundError
from pathlib import Path
for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
    try:
        distribution(name)
    except PackageNotFoundError:
        print(whl)
PYEOF
)
    if [[ -n "$missing" ]]; then
        echo "$(elapsed) installing $(echo "$missing" | wc -l) wheels from $WHEELS"
        # shellcheck disable=SC2086
        pip_install --no-deps $missing || echo "$(elapsed) WARNING: some wheels did not install"
    fi
    # clipforge itself, editable, with the build backend already present (no isolation, no index)
    pip_install --no-deps --no-build-isolation -e . \
        || { echo "$(elapsed) ERROR: pip install -e . failed"; exit 3; }
    "$PY" -c "import clipforge.pretrain, open_clip, webdataset, pytest" \
        || { echo "$(elapsed) ERROR: clipforge does not import after the install"; exit 3; }
    echo "$(elapsed) installed"
fi

exec timeout --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-470}" "$PY" benchmarks/gpu_check.py "$@"
