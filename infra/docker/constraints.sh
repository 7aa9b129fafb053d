#!/usr/bin/env bash
# Rewrite constraints.txt from a virtualenv where `make test` passed (default .venv): the image then
# installs exactly the versions CI tested. Local wheels and the benchmark-only scenedetect are left out.
# ray[default] (the dashboard a KubeRay head serves RayJob submissions from) is not in CI's virtualenv: its
# extra packages are pinned to what pip resolves beside CI's versions.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${1:-$here/../../.venv/bin/python}"
frozen=$("$python" -m pip freeze --exclude-editable | grep -vE "@ file://|^scenedetect==" | sed 's/^torch==\(.*\)+cpu$/torch==\1/')
ray_version=$("$python" -c 'import ray; print(ray.__version__)')
dashboard=$("$python" -m pip install --dry-run --quiet --report - "ray[default]==$ray_version" 2>/dev/null \
  | "$python" -c 'import json, sys
for package in json.load(sys.stdin)["install"]:
    print("{name}=={version}".format(**package["metadata"]))')
{
  echo "# The versions CI tests together (pip freeze of the CI virtualenv; torch's +cpu local tag dropped: the image"
  echo "# installs PyPI's CUDA build of the same release), and ray[default]'s extras resolved beside them."
  echo "# Regenerate with infra/docker/constraints.sh."
  printf '%s\n%s\n' "$frozen" "$dashboard" | sort -f -u
} > "$here/constraints.txt"
