# stop 47, after run47.sh: the default generator recipe (cyclical KL, T 2.5) on the new labels,
# folds 0-3 (new fold CVAEs), from /work/exp/c44 with the worktree /work/wt47
set -x
while pgrep -f "run47.sh" > /dev/null; do sleep 30; done
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt47/platform
B=/work/main/.venv/bin
R=/work/main/docs/results/utility_masked
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U47R --folds 0-3 --config $R/u47r.yaml
date
