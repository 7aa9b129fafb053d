#!/usr/bin/env bash
# Rewrite constraints.txt from a virtualenv where `make test` passed (default .venv): the image then
# installs exactly the versions CI tested (ray[default] included: the ray extra brings it). Local wheels and the
# benchmark-only scenedetect are left out.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${1:-$here/../../.venv/bin/python}"
frozen=$("$python" -m pip freeze --exclude-editable | grep -vE "@ file://|^scenedetect==" | sed 's/^torch==\(.*\)+cpu$/torch==\1/')
{
  echo "# The versions CI tests together (pip freeze of the CI virtualenv; torch's +cpu local tag dropped: the image"
  echo "# installs PyPI's CUDA build of the same release). Regenerate with infra/docker/constraints.sh."
  printf '%s\n' "$frozen" | sort -f -u
} > "$here/constraints.txt"
