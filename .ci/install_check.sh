#!/usr/bin/env bash
# Fresh-install check: install edgellm from pyproject.toml alone (no constraints.txt, not editable) into a
# throwaway virtual environment per Python, then check that `edgellm --help` answers without torch, time it, and
# import the split engine (which needs torch).
#
#   .ci/install_check.sh                      # python3.11 and the newest of python3.13 / python3.12 found
#   .ci/install_check.sh python3.12 /opt/py/bin/python3.13
#   .ci/install_check.sh --demo python3.11    # also run `edgellm demo` (needs the model pulled; ~1 min)
#
# torch comes from wherever pip is configured to look (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS). Before
# installing, the check asks pip which torch it would pick; if that is a CUDA build (it requires nvidia/cuda
# packages: gigabytes), it does not install it: it installs everything else, checks `--help`, and reports SKIP for
# the torch part. Exit status: 1 if any check failed, else 0 (a SKIP is not a failure).
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/edgellm-install-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
DEMO=0
if [[ "${1:-}" == "--demo" ]]; then
    DEMO=1
    shift
fi

find_python() {  # find_python 3.12 -> a python3.12 on PATH, else the newest pyenv 3.12.x
    local found
    found="$(command -v "python$1" 2>/dev/null)" && { echo "$found"; return 0; }
    found="$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$1".*/bin/python 2>/dev/null | sort -V | tail -1)"
    [[ -n "$found" ]] && echo "$found"
}

if [[ $# -eq 0 ]]; then
    set -- "$(find_python 3.11)"
    newer="$(find_python 3.13 || find_python 3.12)"
    [[ -n "$newer" ]] && set -- "$@" "$newer"
fi

# `cmd --help`, timed in a fresh process each run: the first run, then the median and min of five more.
time_help() {
    "$1" - "$2" <<'EOF'
import statistics, subprocess, sys, time

def once() -> float:
    start = time.perf_counter()
    subprocess.run([sys.argv[1], "--help"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start

first = once()
runs = [once() for _ in range(5)]
print(f"  edgellm --help: first {first:.3f} s, then median {statistics.median(runs):.3f} s, min {min(runs):.3f} s (5 runs)")
EOF
}

versions() {
    "$1" - <<'EOF'
import platform
from importlib import metadata

names = ["edgellm", "torch", "transformers", "tokenizers", "numpy", "grpcio", "safetensors", "gguf", "matplotlib"]
found = []
for name in names:
    try:
        found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        found.append(f"{name} -")
print(f"  Python {platform.python_version()}: " + ", ".join(found))
EOF
}

# The torch pip would install for pyproject's range, without installing it: "VERSION cpu" or "VERSION cuda".
torch_candidate() {
    local py="$1" spec
    spec="$("$py" -c 'import sys, tomllib; print(next(d for d in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"] if d.startswith("torch")))' "$ROOT/pyproject.toml")"
    "$py" -m pip install --quiet --disable-pip-version-check --dry-run --no-deps --ignore-installed \
        --report "$WORK/torch.json" "$spec" >/dev/null 2>&1 || return 1
    "$py" - "$WORK/torch.json" <<'EOF'
import json, sys

item = json.load(open(sys.argv[1]))["install"][0]["metadata"]
requires = " ".join(item.get("requires_dist") or []).lower()
print(item["version"], "cuda" if "nvidia" in requires or "cuda" in requires else "cpu")
EOF
}

status=0
for python in "$@"; do
    name="Python $("$python" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo "$python")"
    venv="$WORK/venv-$RANDOM"
    echo "== $python"
    if ! "$python" -m venv "$venv"; then
        echo "FAIL $name: cannot create a virtual environment"; status=1; continue
    fi
    py="$venv/bin/python"
    pip=("$py" -m pip install --quiet --disable-pip-version-check)
    read -r torch_version torch_kind < <(torch_candidate "$py" || echo "none none")
    if [[ "$torch_kind" == "cpu" ]]; then
        start=$SECONDS
        if ! "${pip[@]}" "$ROOT"; then
            echo "FAIL $name: pip install $ROOT"; status=1; continue
        fi
        echo "  installed in $((SECONDS - start)) s (pyproject ranges, no constraints; torch $torch_version)"
    else
        # No CPU torch for this Python: install the rest, so at least the CLI and every other wheel are checked.
        if [[ "$torch_kind" == "none" ]]; then
            echo "  torch: pip finds no torch in pyproject's range for this Python"
        else
            echo "  torch: pip would install $torch_version, a CUDA build (no CPU wheel for this Python): not installing it"
        fi
        others="$("$py" -c 'import sys, tomllib; print("\n".join(d for d in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"] if not d.startswith("torch")))' "$ROOT/pyproject.toml")"
        mapfile -t others <<<"$others"
        if ! "${pip[@]}" "${others[@]}" || ! "${pip[@]}" --no-deps "$ROOT"; then
            echo "FAIL $name: pip install of the dependencies other than torch"; status=1; continue
        fi
    fi
    versions "$py"
    if ! "$venv/bin/edgellm" --help >/dev/null; then
        echo "FAIL $name: edgellm --help"; status=1; continue
    fi
    time_help "$py" "$venv/bin/edgellm"
    if [[ "$torch_kind" != "cpu" ]]; then
        echo "SKIP $name: import edgellm.split.one_process (no CPU torch wheel for this Python)"
        continue
    fi
    if ! "$py" -c 'import time; t = time.perf_counter(); import edgellm.split.one_process; print(f"  import edgellm.split.one_process: {time.perf_counter() - t:.2f} s")'; then
        echo "FAIL $name: import edgellm.split.one_process"; status=1; continue
    fi
    if [[ $DEMO -eq 1 ]] && ! "$venv/bin/edgellm" demo --max-new-tokens 8 --chart "$WORK/demo.png" >"$WORK/demo.log" 2>&1; then
        echo "FAIL $name: edgellm demo (log below)"; cat "$WORK/demo.log"; status=1; continue
    fi
    [[ $DEMO -eq 1 ]] && grep -h "chart" "$WORK/demo.log" | sed 's/^/  demo: /'
    echo "OK   $name"
done
exit "$status"
