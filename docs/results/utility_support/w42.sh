# downstream on an unopacified right heart: the annotated arm on 20 mm and on 30 mm labels, folds 0-3
set -x
cd /work/exp/c44
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
B=/work/main/.venv/bin
date; $B/cardiomotion phantom --out W44 --config w42_30.yaml || exit 1
date; $B/cardiomotion prepare --scans W44/phantom_* --out WP44 --config w42_30.yaml || exit 1
date; $B/cardiomotion annotate --prepared WP44 --out AW20 --config w42_20.yaml || exit 1
date; $B/cardiomotion annotate --prepared WP44 --out AW30 --config w42_30.yaml || exit 1
for f in 0,1 2,3; do
  date; $B/cardiomotion utility --prepared WP44 --flows AW20 --out UW20 --folds $f --config w42_20.yaml
  date; $B/cardiomotion utility --prepared WP44 --flows AW30 --out UW30 --folds $f --config w42_30.yaml
done
date
