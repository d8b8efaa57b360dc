# stop 50: stop the k16 run once folds 0-3 have rows (it resumes later), so that the anchored arm (run50f.sh) starts
while [ "$(wc -l < /work/exp/c44/U50K16/runs.jsonl)" -lt 4 ]; do sleep 20; done
date
pkill -f "out U50K16"; sleep 10
cd /work/exp/c44 && /work/main/.venv/bin/ray stop --force; sleep 5
pkill -f "run50.sh"
date
