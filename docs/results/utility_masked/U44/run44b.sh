set -x
cd /work/exp/c44
while kill -0 25752 2>/dev/null; do sleep 30; done
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
B=/work/main/.venv/bin
date; $B/cardiomotion utility --prepared P --flows A43 --out U44 --folds 4-7 --config u44b.yaml
date
