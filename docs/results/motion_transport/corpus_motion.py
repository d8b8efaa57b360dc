"""How much and how smoothly the corpus samples move: mean |u|, RMS finite-difference gradient and
mean |det J - 1| of the first 48 samples of fold 0's corpus in U46, U48 and U48E (whole grid, voxels).
Usage: python corpus_motion.py (paths of /work/exp/c44, as the runs)."""
import numpy as np, torch
from cardiomotion.generate.corpus import open_corpus
from cardiomotion.flow.metrics import jacobian_determinant
for name in ["U46", "U48", "U48E"]:
    c = open_corpus(f"/work/exp/c44/{name}/folds/phantom_000/corpus")
    g, d, m = [], [], []
    for i in range(48):
        s = c[i]
        u = torch.as_tensor(np.asarray(s["flow"] if isinstance(s, dict) else s.flow, dtype=np.float32))[None]
        grad = torch.stack([torch.diff(u, dim=a)[..., :31, :31, :31] for a in (2, 3, 4)])
        g.append(float(grad.pow(2).mean().sqrt())); m.append(float(u.norm(dim=1).mean()))
        d.append(float((jacobian_determinant(u) - 1).abs().mean()))
    print(name, f"|u| {np.mean(m):.3f} vox  rms grad {np.mean(g):.4f}  |detJ-1| {np.mean(d):.4f}")
