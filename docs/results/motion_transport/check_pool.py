"""Would the folding guard (train/transport.py MAX_FOLDING, added after U48 ran) have dropped any of
U48's pairs? Builds fold K's pool (u48.yaml: 4 partners, seed 0) and reports the dropped pairs and the
folding of the transported fields. Usage: python check_pool.py K (paths of /work/exp/c44, as the runs)."""
import sys, time, torch
from cardiomotion.config import load_config
from cardiomotion.train.fold import plan_fold, load_samples
from cardiomotion.train.transport import transport_pool, partners, register_frames, transport_flow
from cardiomotion.flow.metrics import folding_fraction
fold = int(sys.argv[1])
cfg = load_config("/work/main/docs/results/motion_transport/u48.yaml")
plan = plan_fold("/work/exp/c44/P", "/work/exp/c44/A46_001", fold, "shared")
ids = list(plan.train_ids)
es, flow = load_samples(plan, ids, cfg.intensity.window)
t = time.time()
pool = transport_pool(es, flow, ids, ids, 4, cfg.seed, plan.spacing_mm)
print(f"fold {fold}: {len(pool.pairs)-len(ids)} kept, dropped {pool.dropped}, {time.time()-t:.0f} s")
f = [folding_fraction(pool.flow[n:n+1]) for n in range(len(ids), len(pool.pairs))]
own = [folding_fraction(flow[n:n+1]) for n in range(len(ids))]
print("folding of transported fields: max %.4f mean %.5f; own annotations max %.4f" % (max(f), sum(f)/len(f), max(own)))
