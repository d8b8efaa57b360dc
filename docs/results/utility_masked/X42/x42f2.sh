set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
B=/work/main/.venv/bin
s=phantom_002
uri=$($B/python -c "import json;print(json.load(open('U41/folds/$s/generator.json'))['model_uri'])")
$B/cardiomotion generate --model "$uri" --prepared X42/prepared --out X42/corpus_$s --n 256 --config u41.yaml || exit 1
$B/python /work/main/bench/estimator_curve.py --prepared P --flows A_d40 --config u41.yaml --fold 2 --arms cvae --corpus X42/corpus_$s --n 256 --steps 1000 --every 500 --out X42/curve_extra_f2.jsonl &
$B/python /work/main/bench/estimator_curve.py --prepared P --flows A_d40 --config u41.yaml --fold 2 --arms cvae --corpus U41/folds/$s/corpus --n 256 --steps 1000 --every 500 --out X42/curve_train_f2.jsonl &
wait
date
