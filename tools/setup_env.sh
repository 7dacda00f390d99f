#!/usr/bin/env bash
# Create .venv in the repository root (when missing) and install everything dab-detr needs.
#
# Idempotent: each step first checks whether its result is already there, so a second run with
# nothing changed installs nothing. Every failure names the step that failed.
#
# Why the unusual steps (see README "Install"):
#   * torch 2.15.0 / torchvision 0.29.2 are the PyPI (CUDA) builds: they also run on CPU-only
#     machines, whereas there is no CPU build of torchvision on PyPI.
#   * detectron2 is not on PyPI. `sal-detectron2==0.7.2` is a repackaging of upstream detectron2
#     (commit a59f0563) whose only wheel is tagged cp310; we download it for 3.10, rename it to a
#     py3-none-any wheel and install it without its (numpy<2) pins. A detectron2 that already
#     imports in the venv (for example one built from source) is left alone.
#
# Usage: tools/setup_env.sh          everything: the package, its optional extras and the test-only
#                                     references (what `make test` needs)
#        tools/setup_env.sh --core   the package alone (torch, torchvision, detectron2 and its
#                                     dependencies): what `make demo` and a user need
set -uo pipefail

MODE=full
case "${1:-}" in
  "") ;;
  --core) MODE=core ;;
  *) echo "[setup] unknown argument '$1' (expected nothing or --core)" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="torch==2.15.0"
TORCHVISION_SPEC="torchvision==0.29.2"
D2_SPEC="sal-detectron2==0.7.2"
# detectron2's runtime dependencies (installed by hand because its wheel is installed --no-deps)
# (opencv: Detectron2's Visualizer, which draws the demo's predictions)
D2_DEPS=(fvcore iopath pycocotools omegaconf hydra-core termcolor yacs tabulate cloudpickle
         tqdm matplotlib tensorboard scipy "Pillow" "numpy" opencv-python-headless)
TOOLS=("setuptools<81" pytest "pytest-xdist")
# test-only: the independent reference implementation (transformers' DAB-DETR and Deformable DETR
# ports), its weight formats, and real photographs for the parity tests (scikit-image's data)
# (timm: transformers' DAB-DETR backbone, which follows torchvision's names and DC5 rule)
TEST_DEPS=("transformers==5.23.0" "timm==1.0.31" "safetensors==0.8.0" "scikit-image==0.26.0")
# the optional extras of setup.py, all part of the test install:
#   export  (ONNX export and onnxruntime; torch.onnx's exporter needs onnxscript)
#   cluster (SLURM jobs through submitit)
EXTRA_DEPS=("onnx==1.23.2" "onnxruntime==1.31.1" "onnxscript==0.7.2" "submitit==1.5.4")
# test-only reference for `--source mmdet`: MMDetection 3.3.0 itself (its DAB-DETR), installed with
# `pip install --target` into a folder OUTSIDE the venv's import path; only the subprocess of
# tests/mmdet_reference.py puts it on sys.path (mmcv-lite: no compiled ops, none needed on CPU)
MMDET_DIR="$VENV/mmdet-reference"
MMDET_DEPS=("mmdet==3.3.0" "mmengine==0.10.7" "mmcv-lite==2.2.0" "addict==2.4.0" "yapf==0.43.0"
            "platformdirs==4.14.9" "tomli==2.5.0" "terminaltables==3.1.10" "shapely==2.2.0" "six==1.17.0")

step() { echo "[setup] $*"; }
fail() { echo "[setup] FAILED at step: $1" >&2; [ $# -gt 1 ] && echo "[setup] $2" >&2; exit 1; }

# 1. virtual environment
if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV" || fail "create venv" "'$PYTHON -m venv $VENV' failed (is python3-venv installed?)"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

# checks run from / : from the repository root, `import dab_detr` would find the source folder
# through the current directory and hide a missing install
have() { (cd / && "$PY" -c "$1") >/dev/null 2>&1; }
# version check from package metadata (fast: no import of torch or transformers)
have_version() { (cd / && "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('$1') == '$2' else 1)") >/dev/null 2>&1; }

have_mmdet() {
  [ -f "$MMDET_DIR/mmdet-3.3.0.dist-info/METADATA" ] && [ -f "$MMDET_DIR/mmengine-0.10.7.dist-info/METADATA" ] \
    && [ -f "$MMDET_DIR/mmcv_lite-2.2.0.dist-info/METADATA" ] && [ -f "$MMDET_DIR/addict-2.4.0.dist-info/METADATA" ]
}

CORE_CHECK="
import importlib.metadata as m, importlib.util as u, os, sys
assert m.version('torch') == '2.15.0' and m.version('torchvision') == '0.29.2'
for mod in ('fvcore', 'iopath', 'pycocotools', 'omegaconf', 'hydra', 'termcolor', 'yacs', 'tabulate', 'cloudpickle',
            'tqdm', 'matplotlib', 'tensorboard', 'scipy', 'PIL', 'numpy', 'pytest', 'xdist', 'pkg_resources', 'cv2'):
    assert u.find_spec(mod) is not None, mod
import detectron2.modeling, detectron2.engine, torchvision.ops, dab_detr
assert os.path.realpath(os.path.dirname(dab_detr.__file__)) == os.path.realpath('$ROOT/dab_detr')
"
# fast path: everything already in place -> one check, nothing installed (full: the core check
# plus the extras' and test packages' versions)
if [ "$MODE" = core ] && have "$CORE_CHECK"; then
  step "ready: $VENV (core; nothing to install)"
  exit 0
fi
if have_mmdet && have "$CORE_CHECK
assert m.version('transformers') == '5.23.0' and m.version('timm') == '1.0.31'
assert m.version('safetensors') == '0.8.0' and m.version('scikit-image') == '0.26.0'
assert m.version('onnx') == '1.23.2' and m.version('onnxruntime') == '1.31.1'
assert m.version('onnxscript') == '0.7.2' and m.version('submitit') == '1.5.4'
"; then
  step "ready: $VENV (nothing to install)"
  exit 0
fi

# 2. torch + torchvision
if ! { have_version torch 2.15.0 && have_version torchvision 0.29.2; }; then
  step "installing $TORCH_SPEC $TORCHVISION_SPEC (PyPI builds; about 5 GB, 2 minutes)"
  "${PIP[@]}" "$TORCH_SPEC" "$TORCHVISION_SPEC" || fail "install torch/torchvision" "pip could not install $TORCH_SPEC $TORCHVISION_SPEC"
fi

# 3. detectron2 dependencies, scientific stack and test tools
missing=$("$PY" - <<'PYEOF'
import importlib.util as u
mods = {"fvcore": "fvcore", "iopath": "iopath", "pycocotools": "pycocotools", "omegaconf": "omegaconf",
        "hydra": "hydra-core", "termcolor": "termcolor", "yacs": "yacs", "tabulate": "tabulate",
        "cloudpickle": "cloudpickle", "tqdm": "tqdm", "matplotlib": "matplotlib",
        "tensorboard": "tensorboard", "scipy": "scipy", "PIL": "Pillow", "numpy": "numpy",
        "pytest": "pytest", "xdist": "pytest-xdist", "pkg_resources": "setuptools<81", "cv2": "opencv-python-headless"}
print(" ".join(sorted({v for k, v in mods.items() if u.find_spec(k) is None})))
PYEOF
)
if [ -n "$missing" ]; then
  step "installing dependencies: $missing"
  "${PIP[@]}" "${D2_DEPS[@]}" "${TOOLS[@]}" || fail "install dependencies" "pip could not install: ${D2_DEPS[*]} ${TOOLS[*]}"
fi

# 3b. test-only dependencies
if [ "$MODE" = full ] && ! { have_version transformers 5.23.0 && have_version timm 1.0.31 && have_version safetensors 0.8.0 && have_version scikit-image 0.26.0; }; then
  step "installing test dependencies: ${TEST_DEPS[*]}"
  "${PIP[@]}" "${TEST_DEPS[@]}" || fail "install test dependencies" "pip could not install: ${TEST_DEPS[*]}"
fi

# 3c. optional extras (export, cluster)
if [ "$MODE" = full ] && ! { have_version onnx 1.23.2 && have_version onnxruntime 1.31.1 && have_version onnxscript 0.7.2 && have_version submitit 1.5.4; }; then
  step "installing optional extras: ${EXTRA_DEPS[*]}"
  "${PIP[@]}" "${EXTRA_DEPS[@]}" || fail "install optional extras" "pip could not install: ${EXTRA_DEPS[*]}"
fi

# 3d. test-only mmdet reference, into its own folder (written beside, then moved: never half-installed)
if [ "$MODE" = full ] && ! have_mmdet; then
  step "installing the test-only mmdet reference into $MMDET_DIR: ${MMDET_DEPS[*]}"
  rm -rf "$MMDET_DIR.partial"
  "${PIP[@]}" --no-deps --target "$MMDET_DIR.partial" "${MMDET_DEPS[@]}" \
    || { rm -rf "$MMDET_DIR.partial"; fail "install mmdet reference" "pip --target could not install: ${MMDET_DEPS[*]}"; }
  rm -rf "$MMDET_DIR" && mv "$MMDET_DIR.partial" "$MMDET_DIR" || fail "install mmdet reference" "could not move $MMDET_DIR.partial to $MMDET_DIR"
fi

# 4. detectron2
if ! have "import detectron2, detectron2.modeling, detectron2.engine"; then
  step "installing detectron2 ($D2_SPEC, repackaged upstream detectron2)"
  tmp="$(mktemp -d)"
  "$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
      --python-version 3.10 -d "$tmp" "$D2_SPEC" || fail "download detectron2" "pip download $D2_SPEC failed"
  whl=$(ls "$tmp"/sal_detectron2-*.whl 2>/dev/null | head -n 1)
  [ -n "$whl" ] || fail "download detectron2" "no sal_detectron2 wheel in $tmp"
  cp "$whl" "$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
  "${PIP[@]}" --no-deps "$tmp/sal_detectron2-0.7.2-py3-none-any.whl" || fail "install detectron2" "pip install of the renamed wheel failed"
  rm -rf "$tmp"
  have "import detectron2, detectron2.modeling, detectron2.engine" || fail "import detectron2" "detectron2 installed but does not import: run '$PY -c \"import detectron2.modeling\"' to see why"
fi

# 5. this project, editable
if ! have "import dab_detr, os, sys; sys.exit(0 if os.path.realpath(os.path.dirname(dab_detr.__file__)) == os.path.realpath('$ROOT/dab_detr') else 1)"; then
  step "installing dab_detr (editable)"
  "${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT" || fail "install dab_detr" "pip install -e $ROOT failed"
fi

have "import dab_detr, detectron2, torchvision" || fail "final import check" "'import dab_detr, detectron2, torchvision' fails in $VENV"
step "ready: $VENV ($MODE)"
