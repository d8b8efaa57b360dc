set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt45exp/platform
B=/work/main/.venv/bin
date; $B/python -m cardiomotion.cli utility --prepared P --flows A43 --out U43 --folds 0,1 --config u45.yaml
date
