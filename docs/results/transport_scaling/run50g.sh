# stop 50: the anchored arm at T 0.5 on folds 6-7 (generators adopted from U50A), after run50f.sh
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt50a/platform
B=/work/main/.venv/bin
while pgrep -f "run50f.sh" > /dev/null; do sleep 10; done
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U50A05 --folds 6,7 --config /work/main/docs/results/transport_scaling/u50a05.yaml --generators U50A
date
