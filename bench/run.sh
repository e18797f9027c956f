#!/usr/bin/env bash
# Run the whole benchmark suite and regenerate bench/RESULTS.md from its JSON (bench/results/, with the plots).
#   bash bench/run.sh                      # sizes 64M,256M,1G,4G,16G (each skipped if memory is short)
#   ODFORK_BENCH_SIZES=64M,1G bash bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export ODFORK_BENCH_SIZES="${ODFORK_BENCH_SIZES:-64M,256M,1G,4G,16G}"
python3 -m pytest bench -q -p no:cacheprovider -p no:hypothesispytest -rs --benchmark-only \
    --benchmark-group-by=group --benchmark-sort=name --benchmark-columns=median,min,max,rounds \
    --benchmark-json=bench/results/results.json
python3 bench/workloads.py --json bench/results/workloads.json
python3 bench/report.py bench/results/results.json bench/RESULTS.md bench/results/workloads.json
