set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt46/platform
B=/work/main/.venv/bin
while pgrep -f ann46.sh > /dev/null; do sleep 10; done
for w in 001 003; do
  date; $B/python -m cardiomotion.cli annotate --prepared WP44 --out AW46_$w --network AW30 --config w46_$w.yaml
done
date
