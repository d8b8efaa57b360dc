# stop 48, second: transport with the elbo loss (u48e.yaml), folds 0-3, then the prior bench;
# waits for run48.sh; from /work/exp/c44, the worktree /work/wt48
set -x
while pgrep -f "bash run48.sh" > /dev/null; do sleep 30; done
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt48/platform
B=/work/main/.venv/bin
R=/work/main/docs/results/motion_transport
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U48E --folds 0-3 --config $R/u48e.yaml
date; $B/python /work/wt48/bench/prior_temperature.py --utility U48E --prepared P --flows A46_001 --config $R/u48e.yaml --temperatures 1,2,3 --k 16 --out /work/exp/c48/prior_t_U48E.jsonl > /work/exp/c48/prior_t_U48E.json
date
