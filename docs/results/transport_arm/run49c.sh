# stop 49: the transport arm on folds 0-7 (after U48 folds 6-7); the rebuilt flows' fingerprint printed (it is not stop 46's: see the README)
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt49/platform
B=/work/main/.venv/bin
R=/work/wt49/docs/results/transport_arm
while pgrep -f "run49b.sh" > /dev/null; do sleep 30; done
$B/python -c "from cardiomotion.annotate.stage import flows_fingerprint; from pathlib import Path; print('A46_001', flows_fingerprint(Path('A46_001')))"
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U49T --folds 0-3 --config $R/u49t.yaml
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U49T --folds 4-7 --config $R/u49t.yaml
date
