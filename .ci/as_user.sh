#!/usr/bin/env bash
# CI, second half: the README's test command (and the stress test) as an
# unprivileged user, with the distribution's python3 in a fresh virtual
# environment.  Run as root from the repository root: it makes the user
# (odfork-ci, no groups) if needed and gives it a copy of the tree.
set -euo pipefail
user=odfork-ci
py=${ODFORK_CI_USER_PYTHON:-/usr/bin/python3}
id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
home=$(getent passwd "$user" | cut -d: -f6)
work=$home/odfork_user
rm -rf "$work" "$home/venv"
mkdir -p "$work"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$work"   # the tracked tree only
chown -R "$user:" "$work"
# setpriv keeps the environment (the package index settings); HOME and PATH are the user's
setpriv --reuid="$user" --regid="$user" --init-groups \
    env HOME="$home" PATH=/usr/local/bin:/usr/bin:/bin USER="$user" LOGNAME="$user" \
    bash -euo pipefail -c "
        cd '$work'
        id
        '$py' -m venv '$home/venv'
        . '$home/venv/bin/activate'
        python3 -m pip install -q --upgrade pip
        python3 -m pip install -q '.[test]'
        python3 -P -c 'from odfork_user._core import prepare_process; print(\"fold protection:\", *prepare_process())'
        python3 -m pytest tests -q -p no:cacheprovider
        python3 -m pytest tests/test_launcher.py -q -p no:cacheprovider -m slow
    "
