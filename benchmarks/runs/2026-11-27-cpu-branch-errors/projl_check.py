import sys, math, torch
sys.path.insert(0, "benchmarks/quality"); sys.path.insert(0, ".")
import branch_errors as be, metrics, qcommon as common
from kernels import reference
torch.set_num_threads(2)
model = common.load_model(be.HERE / "checkpoint" / "model", "cpu")
spec, _ = common.trained_spec(be.HERE / "checkpoint" / "model")
n = spec.tokens((1, 2, 2)); nsel = reference.topk_count(0.03, n // 64)
hs = metrics.heldout_set(spec, 2, seed=common.HELDOUT_SEED, sigmas=(0.5,))
with torch.no_grad():
    calls = be.attention_mass.capture_qk(model, hs, n, values=True)
def parts(qh, kh, vh):
    d = qh.shape[1]; eye = torch.eye(d).unsqueeze(0)
    sc = reference.router_scores(qh[None, None], kh[None, None], eye, eye, 128, 64)[0, 0]
    keep = reference.hard_topk_mask(sc, nsel).repeat_interleave(128, 0).repeat_interleave(64, 1)
    p = torch.softmax(qh @ kh.t() / math.sqrt(d), -1); o = p @ vh
    m = (p * keep).sum(-1, keepdim=True); o_s = ((p * keep) @ vh) / m
    lin = (reference.feature_map(qh) @ reference.feature_map(kh).t()) * ~keep
    o_l = (lin @ vh) / (lin.sum(-1, keepdim=True) + 1e-6)
    return o, o_s, o_l
alphas = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
tot = {"SLA2": [], "projl_in": [], "projl_xval": [], "projl_bias_xval": []}
for layer, (q, k, v) in enumerate(calls):
    for h in range(q.shape[1]):
        A = parts(q[0, h], k[0, h], v[0, h]); B = parts(q[1, h], k[1, h], v[1, h])
        o, o_s, o_l = B
        tot["SLA2"].append(float(be.mixed_error(o, o_s, o_l)))
        best_in, best_x, best_xb = 9, 9, 9
        for al in alphas:
            Wa = torch.linalg.lstsq(A[2], A[0] - al * A[1]).solution
            best_x = min(best_x, be.rel(al * o_s + o_l @ Wa, o))
            Wb = torch.linalg.lstsq(o_l, o - al * o_s).solution
            best_in = min(best_in, be.rel(al * o_s + o_l @ Wb, o))
            X = torch.cat([A[2], torch.ones(A[2].shape[0], 1)], 1)
            Wc = torch.linalg.lstsq(X, A[0] - al * A[1]).solution
            best_xb = min(best_xb, be.rel(al * o_s + torch.cat([o_l, torch.ones(o_l.shape[0], 1)], 1) @ Wc, o))
        tot["projl_in"].append(best_in); tot["projl_xval"].append(best_x); tot["projl_bias_xval"].append(best_xb)
    print(layer, {kk: round(sum(vv[-4:]) / 4, 3) for kk, vv in tot.items()}, flush=True)
print("all", {kk: round(sum(vv) / len(vv), 3) for kk, vv in tot.items()})
