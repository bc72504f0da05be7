#!/usr/bin/env bash
# Fill the git-ignored .carry/ with what scripts/gpu_check.sh needs on the GPU machine, which has no network:
# the deepspeed wheel (pure Python, built here), the wheels of its dependencies the device image lacks, the
# nvidia-cutlass headers wheel and the DCNv4 sdist (the peer of `pretrain bench dcn`, built there). Then check
# that the carry closes every dependency gap and print its size: the working tree plus .carry must stay well
# under the device tool's 64 MiB.
#
#   bash scripts/gpu_carry.sh            # idempotent: files already present are kept
#   CARRY_DIR=/tmp/c bash scripts/gpu_carry.sh
#
# Needs network (PyPI) and a Python with pip, torch and packaging here (default: .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=${CARRY_DIR:-.carry}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
LIMIT_MIB=48 # the device tool takes 64 MiB in all; leave room for the tree to grow
mkdir -p "$CARRY"
mapfile -t TODO < <("$PY" scripts/gpu_check/carry.py missing "$CARRY")
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for spec in "${TODO[@]}"; do
  [ -n "$spec" ] || continue
  name=${spec%%==*}
  version=${spec##*==}
  echo "[carry] $spec"
  if [ "$name" = DCNv4 ]; then
    # pip download cannot fetch it (its setup.py needs CUDA to produce metadata): take the sdist's URL and
    # hash from the index's JSON page, and check the hash.
    INDEX=${PIP_INDEX_URL:-https://pypi.org/simple}
    read -r url sha < <(curl -fsS -m 60 -H "Accept: application/vnd.pypi.simple.v1+json" \
      "${INDEX%/}/dcnv4/" | "$PY" -c "
import json, sys
f = next(f for f in json.load(sys.stdin)['files'] if f['filename'] == '$name-$version.tar.gz')
print(f['url'], f['hashes']['sha256'])")
    tmp="$CARRY/.$name.part"
    curl -fsS -m 120 -o "$tmp" "$url"
    echo "$sha  $tmp" | sha256sum -c --quiet
    mv "$tmp" "$CARRY/$name-$version.tar.gz"
    continue
  fi
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$CARRY" "$spec" 2>/dev/null; then
    # no wheel on the index (deepspeed publishes only an sdist): build a pure-Python wheel here, against this
    # venv's torch (no build isolation: an isolated build would download a CUDA torch); DS_BUILD_OPS=0 means
    # no op is compiled, and the run never needs one (torch's AdamW instead of the JIT-built FusedAdam).
    echo "[carry] no wheel for $spec on the index: building one (pip wheel --no-deps)"
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$CARRY" "$spec" || {
      echo "[carry] building $spec failed: $PY needs setuptools and wheel (bash scripts/setup.sh makes such a" \
        ".venv; or set PYTHON)" >&2
      exit 1
    }
  fi
done

"$PY" scripts/gpu_check/carry.py verify "$CARRY"

carry_bytes=$(du -sb "$CARRY" | cut -f1)
tree_bytes=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total=$((carry_bytes + tree_bytes))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "[carry] $CARRY: $(ls "$CARRY" | wc -l) files, $(mib "$carry_bytes"); working tree $(mib "$tree_bytes");" \
  "together $(mib "$total") (device limit 64 MiB, ours $LIMIT_MIB MiB)"
ls -la "$CARRY"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "[carry] too large: the tree plus $CARRY exceed $LIMIT_MIB MiB; untracked files (data/, runs/) must be ignored" >&2
  exit 1
fi
echo "[carry] ok. On the GPU machine (device tool): command 'bash scripts/gpu_check.sh', carry ['$CARRY']"
