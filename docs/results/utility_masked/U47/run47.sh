# stop 47: the record of what ran (from /work/exp/c44, the worktree /work/wt47 at 9ca9afe)
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/wt47/platform
B=/work/main/.venv/bin
R=/work/main/docs/results/utility_masked
# the fold CVAEs of U46 (the copy is what `utility --generators U46` does since 917eb5f) (trained on A46_001), reused: only the prior's temperature changes
for d in U46/folds/*/; do s=$(basename $d); mkdir -p U47T1/folds/$s; cp $d/generator.json U47T1/folds/$s/; done
date; $B/python -m cardiomotion.cli utility --prepared P --flows A46_001 --out U47T1 --folds 0-7 --config $R/u47t1.yaml
date
