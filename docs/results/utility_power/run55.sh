# stop 55: this machine had no experiment folder: rebuild P and A46_001 in /work/exp/c55 (a third label set),
# then the 44-fold run's folds 18-43 into U55F44 (run_folds.sh). Run from anywhere:
#   WT=<checkout> chrt --idle 0 nice -n 19 nohup bash docs/results/utility_power/run55.sh > run55.log 2>&1 &
# (stop 55 ran the same commands as /work/exp/c55/run55.sh with a worktree of 6bc0a88 on PYTHONPATH)
EXP=/work/exp/c55 OUT=U55F44 FOLDS=18-43 exec bash "$(dirname "$0")/run_folds.sh"
