# stop 48, last: transport with the paper loss (u48.yaml) on folds 4-5, into U48; from /work/exp/c44, the worktree /work/wt48b (HEAD 12e31dd)
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt48b/platform
B=/work/main/.venv/bin
R=/work/main/docs/results/motion_transport
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U48 --folds 4,5 --config $R/u48.yaml
date
