# stop 49: the cohort rebuilt (machine-local data were gone), checked against stop 46's flows fingerprint, then the transport arm
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt49/platform
B=/work/main/.venv/bin
R=/work/wt49/docs/results/transport_arm
while pgrep -f "rebuild.sh" > /dev/null; do sleep 30; done
$B/python -c "from cardiomotion.annotate.stage import flows_fingerprint; from pathlib import Path; f = flows_fingerprint(Path('A46_001')); print('A46_001', f); assert f == 'e22c316a0697ff9cb97a0e5713e3a49d72be7b784872924ebba99b1650bb5421'" || exit 1
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U49T --folds 0-3 --config $R/u49t.yaml
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U49T --folds 4-7 --config $R/u49t.yaml
date
