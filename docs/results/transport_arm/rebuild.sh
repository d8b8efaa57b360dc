set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt49/platform
B=/work/main/.venv/bin
date; $B/python -m cardiomotion.cli phantom --out C --config u43.yaml || exit 1
date; $B/python -m cardiomotion.cli prepare --scans C/phantom_* --out P --config u43.yaml || exit 1
date; $B/python -m cardiomotion.cli annotate --prepared P --out A43 --config u43.yaml || exit 1
date; $B/python -m cardiomotion.cli annotate --prepared P --out A46_001 --network A43 --config a46_001.yaml || exit 1
date
