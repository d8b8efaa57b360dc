"""Stop 46's offline probe: which component of the myocardium's motion do the annotations miss?

`python docs/results/utility_masked/U46/component_probe.py PREPARED FLOWS [N]` (here P and A43 of
/work/exp/c44, N 44). Per scan, in the ED myocardium: the LV long axis is the first principal axis
of the ED LV (blood pool and myocardium) voxels, through their centroid; every myocardial voxel
gets a radial (away from the axis, in the short-axis plane), a circumferential (axis × radial)
and a longitudinal unit vector. The truth and the annotation (both pull fields ED←ES, mm) are
split into these components; printed per component: the truth's RMS, the error's RMS, and the
slope of the annotation's component regressed on the truth's (1 = the annotation follows it,
0 = it does not see it at all)."""
import sys

import numpy as np

from cardiomotion.data.phantom import LV_BLOOD, LV_MYO

NAMES = ("radial", "circumferential", "longitudinal")


def split(labels: np.ndarray, *flows: np.ndarray) -> list[np.ndarray]:
    """Each (3, I, J, K) flow's myocardial vectors in the (radial, circumferential, longitudinal)
    frame of the ED ``labels``' LV: (V, 3) per flow, in the flows' units."""
    lv = np.argwhere(np.isin(labels, (LV_BLOOD, LV_MYO))).astype(np.float64)
    c = lv.mean(axis=0)
    axis = np.linalg.eigh(np.cov((lv - c).T))[1][:, -1]
    myo = labels == LV_MYO
    p = np.argwhere(myo).astype(np.float64) - c
    rad = p - (p @ axis)[:, None] * axis
    rad /= np.linalg.norm(rad, axis=1, keepdims=True) + 1e-9
    basis = np.stack([rad, np.cross(axis, rad), np.broadcast_to(axis, rad.shape)], axis=1)  # (V, 3, 3)
    return [np.einsum("vcd,vd->vc", basis, np.asarray(f, np.float64)[:, myo].T) for f in flows]


if __name__ == "__main__":
    from cardiomotion.data.table import load_pair, read_scan_table
    from cardiomotion.flow.io import read_flow
    from cardiomotion.layout import flow_path

    prepared, flows = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 44
    rows = []
    print("scan myoEPE | truth RMS r c l | error RMS r c l | slope annotation~truth r c l (mm)")
    for row in read_scan_table(prepared).to_dict("records")[:n]:
        pair = load_pair(prepared, row, with_truth=True)
        h = float(pair.spacing_mm)
        truth = np.asarray(pair.truth_flow, np.float64) * h
        ann = np.asarray(read_flow(flow_path(flows, row["scan_id"]))[0], np.float64) * h
        t, a = split(pair.ed_labels, truth, ann)
        e = a - t
        slope = [float(np.polyfit(t[:, k], a[:, k], 1)[0]) for k in range(3)]
        myo = pair.ed_labels == LV_MYO
        rec = (float(np.linalg.norm(ann - truth, axis=0)[myo].mean()), *np.sqrt((t ** 2).mean(0)),
               *np.sqrt((e ** 2).mean(0)), *slope)
        rows.append(rec)
        print(row["scan_id"], " ".join(f"{v:.3f}" for v in rec), flush=True)
    m = np.mean(rows, axis=0)
    print("mean", " ".join(f"{v:.3f}" for v in m))
    squared = (np.asarray(rows)[:, 4:7] ** 2).mean(axis=0)  # each scan's mean squared error, averaged
    share = squared / squared.sum()
    print("share of the squared error:", ", ".join(f"{k} {s:.2f}" for k, s in zip(NAMES, share)))
