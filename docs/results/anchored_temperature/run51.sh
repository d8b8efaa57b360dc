# stop 51: the anchored arm at T 0.5 extended to folds 4-7 (U50A05), then at T 0.25 on folds 4-7 (U51A025);
# both adopt the fold CVAEs of U50A (stop 48's transport-trained paper recipe)
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt51/platform
B=/work/main/.venv/bin
R=/work/wt51/docs/results
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U50A05 --folds 4-7 --config $R/transport_scaling/u50a05.yaml --generators U50A
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U51A025 --folds 4-7 --config $R/anchored_temperature/u51a025.yaml --generators U50A
date
