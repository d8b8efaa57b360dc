# stop 50: the anchored arm on folds 4-7 (generators of folds 6-7 adopted from U48, 4-5 trained), after run50.sh
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt50a/platform
B=/work/main/.venv/bin
R=/work/wt50a/docs/results/transport_scaling
while pgrep -f "run50.sh" > /dev/null; do sleep 20; done
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U50A --folds 4-7 --config $R/u50a.yaml --generators U48
date
