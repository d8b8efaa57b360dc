# stop 48: motion transport downstream (cvae arm, fold CVAEs trained with train.transport_partners 4),
# folds 0-3, the prior bench, folds 4-7, the bench again; from /work/exp/c44, the worktree /work/wt48
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt48/platform
B=/work/main/.venv/bin
R=/work/main/docs/results/motion_transport
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U48 --folds 0-3 --config $R/u48.yaml
date; $B/python /work/wt48/bench/prior_temperature.py --utility U48 --prepared P --flows A46_001 --config $R/u48.yaml --temperatures 1,2,3 --k 16 --out /work/exp/c48/prior_t_U48.jsonl > /work/exp/c48/prior_t_U48.json
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U48 --folds 4-7 --config $R/u48.yaml
date; $B/python /work/wt48/bench/prior_temperature.py --utility U48 --prepared P --flows A46_001 --config $R/u48.yaml --temperatures 1,2,3 --k 16 --out /work/exp/c48/prior_t_U48.jsonl > /work/exp/c48/prior_t_U48.json
date
