set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt46/platform
B=/work/main/.venv/bin
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U46 --folds 4-7 --config u46.yaml
date
