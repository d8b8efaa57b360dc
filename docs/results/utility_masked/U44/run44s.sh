set -x
cd /work/exp/c44
while kill -0 5141 2>/dev/null; do sleep 30; done
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
B=/work/main/.venv/bin
date; $B/cardiomotion utility --prepared P --flows A43 --out U43 --folds 0-3 --config u44s_c.yaml
date; $B/cardiomotion utility --prepared P --flows A_d30 --out U42d --folds 0-3 --config u44s_a.yaml
date
