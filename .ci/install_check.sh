#!/usr/bin/env bash
# Checks that `pip install --no-build-isolation .` works where users train: into an environment that
# already has torch, from a copy of this tree, and that the installed package (not this checkout)
# imports from another folder with its compiled extension.
#
# The fresh venv sees the project venv's packages through a .pth file, so torch (several GB) is not
# installed again; --no-deps keeps pip from fetching anything, and the declared install_requires
# are then checked against what that environment holds.
#
# The extension is built CPU-only (USE_CUDA=0) here to keep this check near three minutes on two
# cores: the CUDA build is covered by `make build` and benchmarks/gpu_check.sh, not by this check.
#   bash .ci/install_check.sh            (after `make setup`)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
BASE_PY="${BASE_PY:-$ROOT/.venv/bin/python}"
[ -x "$BASE_PY" ] || { echo "install_check: $BASE_PY not found; run make setup first" >&2; exit 1; }

TMP="$(mktemp -d -t pymks-vae-install.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT
unset PYTHONPATH  # the check must find the installed package, not this checkout

# A copy of the tree as git sees it (tracked and untracked, not ignored files): pip builds in
# place, and its build/ and *.egg-info must land in the copy, not in this checkout.
mkdir "$TMP/src"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -xf - -C "$TMP/src"

# No pip of its own: the bundled pip and setuptools (65 for Python 3.11, without bdist_wheel) would
# shadow the base venv's; the base's pip, run by this interpreter, installs into this venv.
"$BASE_PY" -m venv --without-pip "$TMP/venv"
PY="$TMP/venv/bin/python"
base_site="$("$BASE_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
new_site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# A plain path line: the base venv's own .pth files (its editable link to a checkout) stay unread.
echo "$base_site" > "$new_site/base_venv.pth"

echo "install_check: pip install --no-build-isolation --no-deps (CPU kernels only)"
start=$SECONDS
(cd "$TMP/src" && USE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
  "$PY" -m pip install -q --no-build-isolation --no-deps --no-index . > "$TMP/pip.log" 2>&1) \
  || { tail -40 "$TMP/pip.log" >&2; echo "install_check: pip install failed" >&2; exit 1; }
echo "install_check: installed in $((SECONDS - start)) s"

cd "$TMP"
"$PY" - "$new_site" <<'PY'
import importlib.metadata as md
import os
import sys

import torch

import pymks_vae
from pymks_vae import ops

site = sys.argv[1]
where = os.path.dirname(pymks_vae.__file__)
assert where.startswith(site), f"imported pymks_vae from {where}, not from the fresh install under {site}"
info = pymks_vae.build_info()
print("build_info:", info)
assert info["compiled"] and info["cpu"], "the installed package did not load its compiled extension"
x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
f = ops.two_point_stats(x, [(0, 1)])
assert f.shape == (2, 1, 8, 8)

# Every declared runtime dependency (extras aside) is installed in the environment it went into.
missing = []
for req in md.requires("pymks-vae") or []:
    if "extra ==" in req:
        continue
    name = req.split(";")[0].split("[")[0].strip()
    for ch in "<>=!~ ":
        name = name.split(ch)[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        missing.append(name)
assert not missing, f"declared dependencies not installed: {missing}"
extras = md.metadata("pymks-vae").get_all("Provides-Extra")
assert {"pymks", "distributed"} <= set(extras), extras
print("install_check: OK (pymks_vae from", where + ")")
PY
