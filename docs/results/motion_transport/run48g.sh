# stop 48, fourth: U48E's fold CVAEs sampled at T 1 (u48et1.yaml, --generators U48E: no CVAE trains),
# folds 0-3; waits for run48e.sh; from /work/exp/c44, the worktree /work/wt48
set -x
while pgrep -f "bash run48e.sh" > /dev/null; do sleep 20; done
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt48/platform
B=/work/main/.venv/bin
R=/work/main/docs/results/motion_transport
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U48ET1 --folds 0-3 --generators U48E --config $R/u48et1.yaml
date
