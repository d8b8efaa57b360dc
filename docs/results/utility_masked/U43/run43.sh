set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
B=/work/main/.venv/bin
date; $B/cardiomotion annotate --prepared P --out A43 --config u43.yaml
date; $B/cardiomotion utility --prepared P --flows A43 --out U43 --folds 0,1 --config u43.yaml
date; $B/cardiomotion utility --prepared P --flows A43 --out U43 --folds 2,3 --config u43.yaml
date
