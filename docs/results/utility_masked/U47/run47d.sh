# stop 47, after run47c.sh's T 0 run: the default generator recipe (cyclical KL, T 2.5) fitted to
# the new labels on folds 0-1 (new fold CVAEs), then the prior-temperature probe of those; from
# /work/exp/c44, the worktree /work/wt47b
set -x
while pgrep -f "out U47T0" > /dev/null; do sleep 20; done
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt47b/platform
B=/work/main/.venv/bin
R=/work/main/docs/results/utility_masked
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U47R --folds 0,1 --config $R/u47r.yaml
date; $B/python /work/wt47b/bench/prior_temperature.py --utility U47R --prepared P --flows A46_001 --config $R/u47r.yaml --temperatures 0.5,1,1.5,2,2.5,3,4 --k 16 --out /work/exp/c47/prior_t_U47R.jsonl > /work/exp/c47/prior_t_U47R.json
date
