# stop 47, last: the default recipe on folds 2-3 (into U47R), then cvae>annotated on the stop-46
# corpus, folds 0-3 (into U46: only the missing arm trains); from /work/exp/c44, the worktree /work/wt47c
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt47c/platform
B=/work/main/.venv/bin
R=/work/main/docs/results/utility_masked
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U47R --folds 2,3 --config $R/u47r.yaml
date; $B/python /work/wt47c/bench/prior_temperature.py --utility U47R --prepared P --flows A46_001 --config $R/u47r.yaml --temperatures 0.5,1,1.5,2,2.5,3,4 --k 16 --out /work/exp/c47/prior_t_U47R.jsonl > /work/exp/c47/prior_t_U47R.json
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U46 --folds 0-3 --config $R/u47p.yaml
date
