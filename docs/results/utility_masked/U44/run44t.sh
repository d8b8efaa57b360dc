set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
B=/work/main/.venv/bin
date; $B/cardiomotion utility --prepared P --flows A43 --out U44 --folds 4,5 --config u44s.yaml
date
