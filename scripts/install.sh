#!/usr/bin/env bash
# Installs nnunetv2_rfmedsam and everything it needs into $PYTHON (default python3), on a machine with or
# without a GPU. Safe to re-run: what is already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  # PyPI's default torch (a CUDA build) runs on a CPU as well; installing torch and torchvision in one
  # command makes pip pick a matching pair (a mismatched torchvision fails at import)
  "$PY" -m pip install torch torchvision
fi
if [ "$("$PY" -c 'import importlib.metadata as m; print(m.version("sam2"))' 2>/dev/null)" != "1.1.0" ]; then
  # sam2 ships only an sdist: build it against the installed torch, without its optional CUDA extension
  # (used only for post-processing), instead of letting pip download a second torch into a build env
  "$PY" -m pip install setuptools wheel
  SAM2_BUILD_CUDA=0 "$PY" -m pip install --no-build-isolation sam2==1.1.0
fi
# the napari plugin's Qt needs X11 libraries, and its tests a virtual screen (Xvfb): Qt's offscreen platform has
# no OpenGL context for napari's canvas. Debian's packages; only the missing ones are installed.
QT_PACKAGES="xvfb xauth libgl1 libegl1 libglib2.0-0 libfontconfig1 libdbus-1-3 libxkbcommon-x11-0 libxcb-icccm4
  libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xkb1 libxcb-shape0
  libxcb-cursor0"
MISSING=""
for package in $QT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || MISSING="$MISSING $package"
done
if [ -n "$MISSING" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $MISSING
  else
    echo "install.sh: no apt-get here; the viewer's tests need Xvfb and Qt's X11 libraries:$MISSING" >&2
  fi
fi
# the package, its test tools and napari with PyQt6 (the viewer extra)
"$PY" -m pip install -e ".[test]"
