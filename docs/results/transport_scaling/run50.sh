# stop 50: the transport arm with 16 partners on folds 0-7 (the k scaling point)
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt50/platform
B=/work/main/.venv/bin
R=/work/wt50/docs/results/transport_arm
$B/python -c "from cardiomotion.annotate.stage import flows_fingerprint; from pathlib import Path; print('A46_001', flows_fingerprint(Path('A46_001')))"
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U50K16 --folds 0-7 --config $R/u50k16.yaml
date
