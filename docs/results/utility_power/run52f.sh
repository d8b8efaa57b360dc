# the transport pool and the annotated pairs on folds 8-43 (u52f44.yaml), from /work/exp/c44 (P, A46_001 as at stops 46-51),
# with a worktree of this stop on PYTHONPATH; resumable (a rerun trains only what is missing)
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=${WT:-/work/main}/platform
B=/work/main/.venv/bin
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U52F44 --folds 8-43 --config /work/main/docs/results/utility_power/u52f44.yaml
date
