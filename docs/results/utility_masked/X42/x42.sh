# Pilot: a corpus conditioned on 128 unlabelled anatomies (ES frames of a second phantom cohort,
# seed 1, renamed extra_NNN) from the same fold CVAEs as U41, against U41's corpus (43 training ES
# frames), both through bench/estimator_curve.py (in-process, same seed, 1000 steps)
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
B=/work/main/.venv/bin
date
if [ ! -f X42/prepared/scans.parquet ]; then
  $B/cardiomotion phantom --out X42/cohort --patients 128 --seed 1 --config u41.yaml || exit 1
  cd X42/cohort && for d in phantom_*; do mv "$d" "extra_${d#phantom_}"; done; cd /work/exp/c44
  date; $B/cardiomotion prepare --scans X42/cohort/extra_* --out X42/prepared --config u41.yaml || exit 1
fi
for k in 0 1 2; do
  s=$(printf phantom_%03d $k)
  uri=$($B/python -c "import json;print(json.load(open('U41/folds/$s/generator.json'))['model_uri'])")
  date; $B/cardiomotion generate --model "$uri" --prepared X42/prepared --out X42/corpus_$s --n 256 --config u41.yaml || exit 1
  date; $B/python /work/main/bench/estimator_curve.py --prepared P --flows A_d40 --config u41.yaml --fold $k --arms cvae --corpus X42/corpus_$s --n 256 --steps 1000 --every 500 --out X42/curve_extra.jsonl
  date; $B/python /work/main/bench/estimator_curve.py --prepared P --flows A_d40 --config u41.yaml --fold $k --arms cvae --corpus U41/folds/$s/corpus --n 256 --steps 1000 --every 500 --out X42/curve_train.jsonl
done
date
