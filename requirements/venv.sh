#!/usr/bin/env bash
# Create or update a virtual environment for hbat, one line per step; pip's own output goes to <venv>/setup.log.
#
#   requirements/venv.sh locked .venv          exactly requirements/lock.txt (what CI tests; `make setup`)
#   requirements/venv.sh latest .venv-latest   the newest versions setup.py's ranges allow (`make test-latest`)
#   requirements/venv.sh oldest .venv-oldest   the lower bounds of those ranges (`make test-oldest`)
#
# torch is the CPU wheel on this machine's disk (2.13.0) in all three: a newer or older torch from PyPI is a
# CUDA build of several GB, and hbat's in-place extension (editable install) is built against it.
set -euo pipefail
mode=${1:?usage: venv.sh locked|latest|oldest VENV}
venv=${2:?usage: venv.sh locked|latest|oldest VENV}
python=${PYTHON:-python3.11}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
torch_pin=requirements/torch.txt
log=$venv/setup.log

step() {  # step "what" command...: run quietly, say what; on failure show the end of the log
  local what=$1; shift
  echo "setup ($mode): $what"
  if ! "$@" >>"$log" 2>&1; then
    echo "setup ($mode): FAILED: $what; the last lines of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}

if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$venv"; : >"$log"
  step "creating $venv with $($python --version 2>&1)" "$python" -m venv "$venv"
fi
: >"$log"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)
case "$mode" in
  locked)
    step "installing the pinned environment (requirements/lock.txt)" "${pip[@]}" install -r requirements/lock.txt
    ;;
  latest)
    step "installing the newest pip, setuptools, wheel, ninja" "${pip[@]}" install --upgrade pip setuptools wheel ninja
    step "installing torch (requirements/torch.txt)" "${pip[@]}" install -r "$torch_pin"
    step "installing hbat with the newest versions of its [test] dependencies" \
      "${pip[@]}" install --upgrade --upgrade-strategy eager -c "$torch_pin" --no-build-isolation -e '.[test]'
    ;;
  oldest)
    "$venv/bin/python" requirements/bounds.py >"$venv/oldest-constraints.txt"
    step "installing pip, setuptools, wheel, ninja" "${pip[@]}" install --upgrade pip setuptools wheel ninja
    step "installing torch (requirements/torch.txt)" "${pip[@]}" install -r "$torch_pin"
    step "installing hbat with its [test] dependencies at their lower bounds ($venv/oldest-constraints.txt)" \
      "${pip[@]}" install -c "$torch_pin" -c "$venv/oldest-constraints.txt" --no-build-isolation -e '.[test]'
    ;;
  *) echo "usage: venv.sh locked|latest|oldest VENV" >&2; exit 2 ;;
esac
if [ "$mode" = locked ]; then
  step "building hbat (C++ extension, editable install)" "${pip[@]}" install --no-build-isolation --no-deps -e .
fi
"$venv/bin/python" - <<'PY'
import importlib.metadata as md

found = []
for name in ("torch", "transformers", "trl", "accelerate", "deepspeed", "peft", "datasets", "triton", "tokenizers"):
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
print("setup: installed " + ", ".join(found))
PY
