set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt45exp/platform
B=/work/main/.venv/bin
while pgrep -f run45p.sh > /dev/null; do sleep 20; done
date; $B/python -m cardiomotion.cli utility --prepared P --flows A43 --out U43 --folds 2,3 --config u45.yaml
date; $B/python -m cardiomotion.cli utility --prepared P --flows A43 --out U44 --folds 4-7 --config u45.yaml
date
