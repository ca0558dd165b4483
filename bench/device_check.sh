#!/usr/bin/env bash
# The CUDA checks of issue 12 on a GPU machine that has Python and torch but neither Flower nor
# a network (and no room for Ray's wheel): Flower travels as wheels, Ray is not needed.
#
#   bash bench/device_check.sh fetch [3.12]  # here: Flower, its dependencies and constriction,
#                                            # pinned to this environment's versions, as wheels
#                                            # for that Python into .whl/ (about 30 MB; carry it)
#   bash bench/device_check.sh run [OUT]     # there: a venv over the system's torch with those
#                                            # wheels, then the CUDA tests, the TLS deployment
#                                            # test (SuperLink + SuperNodes, device auto = CUDA)
#                                            # and the bare-loop round times on CPU and CUDA;
#                                            # the log goes to OUT/device-check.log too
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl

case "${1:-}" in
fetch)
  python=${2:-3.12}
  mkdir -p "$WHEELS"
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qxF "/$WHEELS/" "$exclude" 2>/dev/null || echo "/$WHEELS/" >>"$exclude"
  # Flower's requirement closure as installed here, without uv (only `flwr run`'s dependency
  # installer uses it) and numpy (the machine's own serves), plus the mask coder.
  python3 - <<'EOF' >"$WHEELS/requirements.txt"
import importlib.metadata as metadata
import re

seen, todo = {}, ["flwr", "constriction"]
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen or name in {"uv", "numpy"}:
        continue
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        continue  # an optional extra that is not installed here
    seen[name] = dist.version
    todo += [re.split(r"[ ;<>=!\[~(]", r)[0] for r in dist.requires or [] if "extra ==" not in r]
print("\n".join(f"{name}=={version}" for name, version in sorted(seen.items())))
EOF
  platforms=()
  for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python" --implementation cp \
    "${platforms[@]}" -d "$WHEELS" -r "$WHEELS/requirements.txt"
  du -sh "$WHEELS"
  ;;
run)
  out=${2:-${OUT:-/tmp}}
  venv=/tmp/feddst-device-venv
  # python3 there may itself be a venv (--system-site-packages would skip its torch): a fresh
  # venv whose own packages come first, then python3's through a .pth file.
  python3 -m venv "$venv"
  python3 -c "import site; print('\n'.join(site.getsitepackages()))" \
    >"$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")/device-python.pth"
  "$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl
  export PYTHONPATH=$PWD FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 PYTHONUNBUFFERED=1
  step() { echo "== $*"; "$@" || echo "== FAILED (exit $?): $*"; }
  {
    step nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    step "$venv/bin/python" -c "import torch, flwr; print('torch', torch.__version__, 'flwr', flwr.__version__, 'cuda', torch.cuda.is_available())"
    step "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_deploy.py
    step "$venv/bin/python" bench/round_time.py --bare-only --device cpu --device cuda
  } 2>&1 | tee "$out/device-check.log"
  ;;
*)
  sed -n 2,12p "$0"
  exit 2
  ;;
esac
