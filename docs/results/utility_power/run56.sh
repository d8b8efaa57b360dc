# stop 56: a new machine again, no experiment folder: rebuild P and A46_001 (a fourth label set, docs/results/transport_arm/rebuild.sh's commands),
# then the 44-fold run's remaining folds 24-43 (u52f44.yaml) into U56F44. Under SCHED_IDLE a stage's Ray start-up can time out
# while the test suite holds both cores, so each stage is retried (each resumes). Run from anywhere:
#   WT=<checkout> chrt --idle 0 nice -n 19 nohup bash docs/results/utility_power/run56.sh > run56.log 2>&1 &
# (stop 56 ran it with a worktree of its start, b18e87e, on PYTHONPATH)
set -x
REPO=/work/main
mkdir -p /work/exp/c56 && cd /work/exp/c56 || exit 1
cp -n $REPO/docs/results/utility_masked/u43.yaml $REPO/docs/results/annotation_volume/a46_001.yaml .
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=${WT:-$REPO}/platform
B=$REPO/.venv/bin
retry() { for i in 1 2 3 4 5 6 7 8 9 10; do date; "$@" && return 0; sleep 120; done; return 1; }
[ -d C ] || retry $B/python -m cardiomotion.cli phantom --out C --config u43.yaml || exit 1
[ -f P/scans.parquet ] || retry $B/python -m cardiomotion.cli prepare --scans C/phantom_* --out P --config u43.yaml || exit 1
retry $B/python -m cardiomotion.cli annotate --prepared P --out A43 --config u43.yaml || exit 1
retry $B/python -m cardiomotion.cli annotate --prepared P --out A46_001 --network A43 --config a46_001.yaml || exit 1
retry $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U56F44 --folds 24-43 --config $REPO/docs/results/utility_power/u52f44.yaml
date
