# stop 52: the estimator budget on folds 0-3 (transport and annotated at 2000 steps, U51S2000), so the budget lean has all 8 folds
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt52/platform
B=/work/main/.venv/bin
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U51S2000 --folds 0-7 --config /work/main/docs/results/anchored_temperature/u51s2000.yaml
date
