set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt46/platform
B=/work/main/.venv/bin
for w in 003 001 01 0003; do
  date; $B/python -m cardiomotion.cli annotate --prepared P --out A46_$w --network A43 --config a46_$w.yaml
done
date
