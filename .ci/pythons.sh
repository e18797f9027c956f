#!/usr/bin/env bash
# The README's test command on every Python this project supports that this machine has:
# the distribution's python3 (3.11.2 on Debian 12) and pyenv's 3.12.1 and 3.13.0.  Each gets a
# fresh virtual environment with ".[test]" installed from this clone.  Exit status: 0 when every
# interpreter found passed; a missing interpreter is reported and skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHONS=(/usr/bin/python3 /root/.pyenv/versions/3.12.1/bin/python3 /root/.pyenv/versions/3.13.0/bin/python3)
failed=()
for py in "${PYTHONS[@]}"; do
    if [ ! -x "$py" ]; then
        echo "== $py: not on this machine, skipped"
        continue
    fi
    venv="/tmp/odfork-pythons-$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
    echo "== $py ($("$py" --version 2>&1)) in $venv"
    rm -rf "$venv"
    if ! "$py" -m venv "$venv"; then
        echo "== $py: cannot make a virtual environment (Debian: apt-get install python3-venv)"
        failed+=("$py")
        continue
    fi
    # -P: the installed package (with its built core) is imported, not the source folder
    if ! ( . "$venv/bin/activate" && python3 -m pip install -q --upgrade pip && python3 -m pip install -q ".[test]" \
           && python3 -m pytest tests -q -p no:cacheprovider ); then
        failed+=("$py")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "== failed: ${failed[*]}"
    exit 1
fi
echo "== all passed"
