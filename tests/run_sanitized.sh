#!/usr/bin/env bash
# Build the C core with AddressSanitizer + UndefinedBehaviorSanitizer in a scratch
# copy and run the given tests against it (default: isolation, core, spawn/snapshot).
#   bash tests/run_sanitized.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src"
cp -r "$root/csrc" "$root/tests" "$work/"
cp -r "$root/src/odfork_user" "$work/src/"
rm -f "$work"/src/odfork_user/*.so
(cd "$work" && ODFORK_SANITIZE=address,undefined python3 src/odfork_user/_ffi_build.py >/dev/null)
cd "$work/tests"
if [ $# -eq 0 ]; then
    set -- test_isolation.py test_core.py test_spawn_snapshot.py test_kernel_writes.py test_page_cow.py test_adversarial.py
fi
# Python itself is not built with ASan: preload the runtimes.  Leak detection is
# off (the interpreter keeps memory at exit on purpose); ASan's own SIGSEGV
# handler is off so that arena faults reach the core's handler.
# Reports go to files (log_path): pytest's fd capture would swallow the fd 2
# of a process that dies, and with it the report; they are printed below.
logs="$work/sanitizer-logs"
mkdir -p "$logs"
export ASAN_OPTIONS=detect_leaks=0:handle_segv=0:abort_on_error=1:log_path=$logs/asan
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$logs/ubsan
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
rc=0
PYTHONPATH="$work/src" python3 -P -m pytest -q -p no:cacheprovider "$@" || rc=$?
for f in "$logs"/*; do
    [ -e "$f" ] || continue
    echo "==== sanitizer report $(basename "$f") ===="
    cat "$f"
    rc=1
done
exit $rc
