#!/usr/bin/env bash
# Run the whole benchmark suite and regenerate bench/RESULTS.md and the plots from its JSON.
#   bash bench/run.sh                      # sizes 64M,256M,1G,4G,16G (each skipped if memory is short)
#   ODFORK_BENCH_SIZES=64M,1G bash bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export ODFORK_BENCH_SIZES="${ODFORK_BENCH_SIZES:-64M,256M,1G,4G,16G}"
python3 -P -m pytest bench -q -p no:cacheprovider -p no:hypothesispytest -rs --benchmark-only \
    --benchmark-group-by=group --benchmark-sort=name --benchmark-columns=median,min,max,rounds \
    --benchmark-json=bench/results.json
python3 -P bench/workloads.py --json bench/workloads.json
python3 -P bench/report.py bench/results.json bench/RESULTS.md bench/workloads.json
