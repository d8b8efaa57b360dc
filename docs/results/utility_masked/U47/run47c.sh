# stop 47, after run47.sh's T 1 run: the same fold CVAEs at T 0 (through --generators); from
# /work/exp/c44, the worktree /work/wt47b (run47d.sh goes on from here)
set -x
while pgrep -f "out U47T1" > /dev/null; do sleep 20; done
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt47b/platform
B=/work/main/.venv/bin
R=/work/main/docs/results/utility_masked
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U47T0 --folds 0-7 --generators U46 --config $R/u47t0.yaml
date
