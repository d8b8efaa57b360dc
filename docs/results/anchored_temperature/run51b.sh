# stop 51: the estimator budget: transport and annotated arms at 2000 steps on folds 4-7 (U51S2000), after run51.sh
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt51/platform
B=/work/main/.venv/bin
while pgrep -f "run51[.]sh" > /dev/null; do sleep 10; done
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U51S2000 --folds 4-7 --config /work/main/docs/results/anchored_temperature/u51s2000.yaml
date
