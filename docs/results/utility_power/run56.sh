# stop 56: a new machine again, no experiment folder: rebuild P and A46_001 in /work/exp/c56 (the fourth
# rebuild; its flows came out identical to stop 46's, e22c31...), then the 44-fold run's remaining folds
# 24-43 into U56F44 (run_folds.sh). Run from anywhere:
#   WT=<checkout> chrt --idle 0 nice -n 19 nohup bash docs/results/utility_power/run56.sh > run56.log 2>&1 &
# (stop 56 ran the same commands, then inline in this file, with a worktree of b18e87e on PYTHONPATH)
EXP=/work/exp/c56 OUT=U56F44 FOLDS=24-43 exec bash "$(dirname "$0")/run_folds.sh"
