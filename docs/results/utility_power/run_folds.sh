# The 44-fold run (transport against the annotated pairs, u52f44.yaml) on a machine whose experiment
# folder may be gone: rebuild P and A46_001 in EXP with the recorded commands (those of
# docs/results/transport_arm/rebuild.sh; skipped where done), then `utility` on FOLDS into EXP/OUT.
# Under SCHED_IDLE a stage's Ray start-up can time out while the test suite holds both cores, so each
# stage is retried (each resumes). run55.sh and run56.sh call it with their stops' folders and folds:
#   EXP=/work/exp/c56 OUT=U56F44 FOLDS=24-43 [WT=<checkout>] chrt --idle 0 nice -n 19 nohup bash run_folds.sh > run.log 2>&1 &
set -x
REPO=/work/main
: "${EXP:?EXP: the experiment folder}" "${OUT:?OUT: the utility folder in it}" "${FOLDS:?FOLDS: e.g. 24-43}"
mkdir -p "$EXP" && cd "$EXP" || exit 1
cp -n $REPO/docs/results/utility_masked/u43.yaml $REPO/docs/results/annotation_volume/a46_001.yaml .
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=${WT:-$REPO}/platform
B=$REPO/.venv/bin
retry() { for i in 1 2 3 4 5 6 7 8 9 10; do date; "$@" && return 0; sleep 120; done; return 1; }
[ -d C ] || retry $B/python -m cardiomotion.cli phantom --out C --config u43.yaml || exit 1
[ -f P/scans.parquet ] || retry $B/python -m cardiomotion.cli prepare --scans C/phantom_* --out P --config u43.yaml || exit 1
retry $B/python -m cardiomotion.cli annotate --prepared P --out A43 --config u43.yaml || exit 1
retry $B/python -m cardiomotion.cli annotate --prepared P --out A46_001 --network A43 --config a46_001.yaml || exit 1
retry $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out "$OUT" --folds "$FOLDS" --config $REPO/docs/results/utility_power/u52f44.yaml
date
