# stop 49: U48 (transport, paper loss) folds 6-7, after run49.sh, to complete its 8 folds
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt49/platform
B=/work/main/.venv/bin
while pgrep -f "run49.sh" > /dev/null; do sleep 30; done
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U48 --folds 6,7 --config /work/wt49/docs/results/motion_transport/u48.yaml
date
