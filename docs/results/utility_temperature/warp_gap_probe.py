"""Domain-gap probe: same estimator, same budget, trained on (a) real pairs with exact flows,
(b) ES warped by the exact flow (a generator-free 'perfect corpus'), with/without independent
noise augmentation. Held-out scan = fold's scan. Writes one JSON line per run."""
import argparse, json, sys, time
import numpy as np, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "platform"))  # the repo's package
from cardiomotion.config import load_config
from cardiomotion.evaluate.utility_estimator import held_out_pair as _held_out, training_arrays as _training_arrays
from cardiomotion.evaluate.utility_plan import estimator_settings
from cardiomotion.evaluate.utility import PairSource, Batch, source_batches, train_estimator, score_estimate
from cardiomotion.annotate.pwc import build_pwcnet
from cardiomotion.data.intensity import hu_to_unit
from cardiomotion.data.table import read_scan_table
from cardiomotion.flow.warp import warp

p = argparse.ArgumentParser()
p.add_argument("--fold", type=int); p.add_argument("--arm"); p.add_argument("--noise", type=float, default=0.0)
p.add_argument("--flows", default="T"); p.add_argument("--seed", type=int, default=0); p.add_argument("--out")
a = p.parse_args()
torch.set_num_threads(1)
cfg = load_config("u20a.yaml")
ids = sorted(read_scan_table("P").scan_id.astype(str))
scan = ids[a.fold]; train = [s for s in ids if s != scan]
es, ed, fl = _training_arrays("P", a.flows, train)
if a.arm == "warped":  # ED := round(warp(ES, flow)) as a corpus stores it
    ed = warp(torch.from_numpy(es)[:, None], torch.from_numpy(fl)).round().clamp(-32768, 32767)[:, 0].numpy()
window = cfg.intensity.window
src = PairSource(es, ed, fl, window)
sig = a.noise / (window[1] - window[0])
gen = torch.Generator().manual_seed(1000 + a.seed)
def stream():
    for b in source_batches(src, cfg.utility.batch_size, a.seed):
        if sig > 0:
            b = Batch(b.es + sig * torch.randn(b.es.shape, generator=gen), b.ed + sig * torch.randn(b.ed.shape, generator=gen), b.flow)
        yield b
torch.manual_seed(a.seed)
model = build_pwcnet(cfg)
settings = estimator_settings(cfg, len(model.channels))
t0 = time.time()
losses = train_estimator(model, stream(), settings)
pair = _held_out("P", scan); model.eval()
with torch.no_grad():
    pred = model(hu_to_unit(torch.from_numpy(pair.ed)[None, None], window), hu_to_unit(torch.from_numpy(pair.es)[None, None], window)).flow[0]
s = score_estimate(pred, pair.truth_flow, pair.spacing_mm, pair.ed_labels, pair.es_labels)
row = {"fold": a.fold, "scan": scan, "arm": a.arm, "flows": a.flows, "noise_hu": a.noise, "seed": a.seed, **s.as_dict(),
       "final_loss": float(np.mean(losses[-100:])), "train_s": round(time.time() - t0, 1)}
with open(a.out, "a") as f: f.write(json.dumps(row) + "\n")
print(row)
