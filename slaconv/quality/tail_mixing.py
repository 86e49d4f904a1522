"""Alpha per query from an estimate of the tail's softmax mass, for the tail-estimator study.

SLA2's ``mixing: query`` (docs/design.md section 1) mixes row i as ``alpha_i O_s + (1 - alpha_i) T`` with

    alpha_i = sigmoid(gap_i + c_h),   gap_i = lse_sel,i - lse_pool,i

where ``lse_sel`` is the sparse branch's own log row sum and ``lse_pool`` the log-sum-exp of the pooled logits
of the unselected key blocks (:func:`tail_estimators.pooled_logits`).  The study compares ways of choosing the
per-head ``c_h`` on training rows, and one refinement, a per-head affine map ``sigmoid(a_h gap_i + c_h)``:

* ``shift``: the c_h minimising the summed squared attention error (a 0.02 grid over [-8, 8]);
* ``affine``: (a_h, c_h) minimising it, by L-BFGS from (1, the shift);
* ``mass``: the mean over rows of ``lse_pool - lse_tail`` (the exact tail's log mass), so that alpha_i is on
  average the selected mass in log-odds: the counterpart of ``convert``'s selected-mass start of a per-head alpha;
* ``head_train``: no per-query alpha, a per-head least-squares alpha fitted on the same training rows (the fair
  per-head comparison: the study's other per-head rows fit alpha on the held-out samples themselves);
* ``query_linear``: no mass estimate at all, ``sigmoid(w_h . q_i / sqrt(d) + c_h)``, a learned linear function of
  the query row (d + 1 parameters per head, by L-BFGS from the per-head least-squares alpha): whether the query
  itself says how much of its attention the selected blocks miss, with no pass over the unselected keys;
* ``gap_query_linear``: both, ``sigmoid(a_h gap_i + w_h . q_i / sqrt(d) + c_h)`` (from the affine fit);
* ``block_shift``, ``block_affine`` and ``block_gap_query_linear``: ``shift``, ``affine`` and ``gap_query_linear``
  with the pooled tail's
  log-sum-exp taken once per query block, from the block's mean query (:func:`block_mass_gap`; the row keeps
  its own ``lse_sel``): whether the tail pass over every key block for every row can shrink to one per query
  block (an nq x nk product, the size of the router's) without losing what the per-row estimate gives;
* ``block_query_linear``: ``sigmoid(gap_block,i + w_h . q_i / sqrt(d) + c_h)``, the block-pooled log-odds at
  unit scale: the form the sparse launch's per-query mix computes as it stands, if the value it reads per row
  in place of the tail log-sum-exp is the block's pooled one minus the query's linear term.
"""

from __future__ import annotations

import torch

from slaconv.quality import tail_estimators as te

TAILS = ("exact", "linear", "hedgehog")
MIXINGS = ("shift", "affine", "mass", "head_train", "query_linear", "gap_query_linear", "block_shift",
           "block_affine", "block_gap_query_linear", "block_query_linear")
SHIFT_GRID = torch.arange(-8.0, 8.0 + 1e-9, 0.02)


def row_terms(o: torch.Tensor, o_s: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per row (B, H, N), float64: the squared error of ``alpha O_s + (1 - alpha) T`` is ``a2 alpha^2 + 2 a1 alpha
    + a0``."""
    x, y = (o_s - tail).double(), (tail - o).double()
    return x.square().sum(-1), (x * y).sum(-1), y.square().sum(-1)


def mass_gap(q: torch.Tensor, k: torch.Tensor, lut: torch.Tensor, lse_s: torch.Tensor, block_q: int,
             block_k: int) -> torch.Tensor:
    """``lse_sel - lse_pool`` per row (B, H, Nq): the log-odds of the selected blocks against the pooled tail."""
    return lse_s - torch.logsumexp(te.pooled_logits(q, k, lut, block_q, block_k), dim=-1)


def block_mass_gap(q: torch.Tensor, k: torch.Tensor, lut: torch.Tensor, lse_s: torch.Tensor, block_q: int,
                   block_k: int) -> torch.Tensor:
    """:func:`mass_gap` with the pooled tail's log-sum-exp from each query block's mean query, the same for
    every row of the block (``lse_sel`` stays the row's own)."""
    b, h, n, d = q.shape
    q_bar = q.view(b, h, n // block_q, block_q, d).mean(dim=3).repeat_interleave(block_q, dim=2)
    return lse_s - torch.logsumexp(te.pooled_logits(q_bar, k, lut, block_q, block_k), dim=-1)


def tail_of(kind: str, q, k, v, lut, block_q: int, block_k: int, features) -> torch.Tensor:
    """The linear-attention tail of ``kind`` over the unselected blocks; ``features`` = (W_q, W_k) for hedgehog.
    (The exact tail needs the dense output: :func:`tail_estimators.exact_tail`.)"""
    if kind == "linear":
        fq, fk = te.softmax_features(q), te.softmax_features(k)
    else:
        fq, fk = te.hedgehog_features(q, features[0]), te.hedgehog_features(k, features[1])
    return te.kernel_tail(fq, fk, v, lut, block_q, block_k)


def _error(a2, a1, a0, alpha):
    return (alpha.square() * a2 + 2 * alpha * a1 + a0).sum(dim=-1)


@torch.no_grad()
def _fit_shift(a2, a1, a0, gap) -> torch.Tensor:
    grid = SHIFT_GRID.double().to(gap.device)
    errs = torch.stack([_error(a2, a1, a0, torch.sigmoid(gap + c)) for c in grid], dim=-1)  # (H, G)
    return grid[errs.argmin(dim=-1)]


def _fit_affine(a2, a1, a0, gap, shift) -> torch.Tensor:
    params = torch.stack([torch.ones_like(shift), shift]).requires_grad_(True)  # (2, H)
    opt = torch.optim.LBFGS([params], max_iter=100, line_search_fn="strong_wolfe")
    scale = float(_error(a2, a1, a0, torch.sigmoid(gap + shift.unsqueeze(-1))).sum().clamp_min(1e-30))

    def closure():
        opt.zero_grad()
        loss = _error(a2, a1, a0, torch.sigmoid(params[0].unsqueeze(-1) * gap + params[1].unsqueeze(-1))).sum()
        (loss / scale).backward()
        return loss / scale

    opt.step(closure)
    return params.detach()


def _query_logit(params: torch.Tensor, gap: torch.Tensor, q: torch.Tensor, with_gap: bool | str) -> torch.Tensor:
    """``[a_h gap +] w_h . q / sqrt(d) + c_h`` per row: ``params`` (H, d + 1 [+ 1]) = (w, c[, a]); ``gap`` (..., H, R),
    ``q`` (..., H, R, d); ``with_gap="unit"``: ``gap`` added at scale 1 (no a_h)."""
    d = q.shape[-1]
    logit = (q.double() * params[:, :d].unsqueeze(-2)).sum(-1) / d ** 0.5 + params[:, d].unsqueeze(-1)
    if with_gap == "unit":
        return logit + gap
    return logit + params[:, d + 1].unsqueeze(-1) * gap if with_gap else logit


def _fit_query_linear(a2, a1, a0, gap, q, start: torch.Tensor, with_gap: bool | str) -> torch.Tensor:
    params = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([params], max_iter=200, line_search_fn="strong_wolfe")
    scale = float(_error(a2, a1, a0, torch.sigmoid(_query_logit(start, gap, q, with_gap))).sum().clamp_min(1e-30))

    def closure():
        opt.zero_grad()
        loss = _error(a2, a1, a0, torch.sigmoid(_query_logit(params, gap, q, with_gap))).sum() / scale
        loss.backward()
        return loss

    opt.step(closure)
    return params.detach()


def fit(a2, a1, a0, gap, log_mass_error, q, gap_block=None) -> dict[str, torch.Tensor]:
    """Every mixing's per-head parameters from training rows (H, R) in float64; ``log_mass_error`` is
    ``lse_pool - lse_tail`` per row (nan where the selected blocks hold all of the mass); ``q`` the rows' queries
    (H, R, d); ``gap_block`` the block-pooled gap of the ``block_*`` mixings (:func:`block_mass_gap`; default
    ``gap``)."""
    gap_block = gap if gap_block is None else gap_block
    shift = _fit_shift(a2, a1, a0, gap)
    affine = _fit_affine(a2, a1, a0, gap, shift)
    head = te.least_squares_alpha(a2.sum(dim=-1), a1.sum(dim=-1))
    heads, d = q.shape[0], q.shape[-1]
    zeros = torch.zeros(heads, d, dtype=torch.float64, device=q.device)
    logit_head = torch.logit(head.double().clamp(1e-4, 1 - 1e-4)).view(heads, 1)
    linear = _fit_query_linear(a2, a1, a0, gap, q, torch.cat([zeros, logit_head], dim=1), with_gap=False)
    both = _fit_query_linear(a2, a1, a0, gap, q, torch.cat([zeros, affine[1].view(heads, 1), affine[0].view(heads, 1)],
                                                             dim=1), with_gap=True)
    block_shift = _fit_shift(a2, a1, a0, gap_block)
    block_affine = _fit_affine(a2, a1, a0, gap_block, block_shift)
    block_both = _fit_query_linear(a2, a1, a0, gap_block, q, torch.cat(
        [zeros, block_affine[1].view(heads, 1), block_affine[0].view(heads, 1)], dim=1), with_gap=True)
    block_unit = _fit_query_linear(a2, a1, a0, gap_block, q, torch.cat([zeros, block_shift.view(heads, 1)], dim=1),
                                   with_gap="unit")
    return {"shift": shift, "affine": affine, "mass": log_mass_error.nanmean(dim=-1), "head_train": head,
            "query_linear": linear, "gap_query_linear": both, "block_shift": block_shift, "block_affine": block_affine,
            "block_gap_query_linear": block_both, "block_query_linear": block_unit}


def alpha(mixing: str, params: torch.Tensor, gap: torch.Tensor, q: torch.Tensor | None = None,
          gap_block: torch.Tensor | None = None) -> torch.Tensor:
    """Alpha per row (B, H, N, 1) of ``mixing`` with its fitted per-head ``params``, from ``gap`` (B, H, N) (for
    the ``block_*`` mixings ``gap_block``) and, for the query-linear mixings, the queries ``q`` (B, H, N, d)."""
    if mixing == "block_query_linear":
        return torch.sigmoid(_query_logit(params, gap_block.double(), q, "unit")).unsqueeze(-1)
    if mixing.startswith("block_"):
        mixing, gap = mixing.removeprefix("block_"), gap_block
    gap = gap.double()
    if mixing == "head_train":
        return params.view(1, -1, 1, 1).expand(*gap.shape, 1)
    if mixing == "affine":
        a, c = params[0].view(1, -1, 1), params[1].view(1, -1, 1)
        return torch.sigmoid(a * gap + c).unsqueeze(-1)
    if mixing in ("query_linear", "gap_query_linear"):
        return torch.sigmoid(_query_logit(params, gap, q, mixing == "gap_query_linear")).unsqueeze(-1)
    return torch.sigmoid(gap + params.view(1, -1, 1)).unsqueeze(-1)


def fit_layer(data, features, fractions, block_q: int, block_k: int) -> dict:
    """{fraction: {tail: {mixing: per-head params}}} for one layer from its training rows (``tail_fit.FitRows``
    with the dense log-sum-exp); ``features`` = the layer's fitted Hedgehog (W_q, W_k)."""
    out: dict = {}
    for f in fractions:
        for kind in TAILS:
            parts = []
            for r in data:
                if kind == "exact":
                    tail = te.exact_tail(r.o, r.lse, r.o_s[f], r.lse_s[f])[0]
                else:
                    tail = tail_of(kind, r.q, r.k, r.v, r.luts[f], block_q, block_k, features)
                gap = mass_gap(r.q, r.k, r.luts[f], r.lse_s[f], block_q, block_k).double()
                gap_block = block_mass_gap(r.q, r.k, r.luts[f], r.lse_s[f], block_q, block_k).double()
                m = torch.exp(r.lse_s[f] - r.lse).clamp(max=1.0).double()
                lse_tail = r.lse.double() + torch.log1p(-m)
                lse_pool = r.lse_s[f].double() - gap
                parts.append((*row_terms(r.o, r.o_s[f], tail), gap, torch.where(m < 1 - 1e-6, lse_pool - lse_tail,
                                                                                 torch.nan), r.q.double(), gap_block))
            stacked = [torch.cat([p[i][0] for p in parts], dim=1) for i in range(7)]  # (H, R) and q (H, R, d)
            out.setdefault(f, {})[kind] = fit(*stacked)
    return out


def measure(o, o_s, tails: dict, gap: torch.Tensor, params: dict, block_q: int,
            q: torch.Tensor, gap_block: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Squared error per (B, H, query block) of every (tail, mixing) on one held-out layer: {"tail_mixing": ...};
    ``q`` (B, H, N, d) the layer's queries; ``gap_block`` that of the ``block_*`` mixings (default ``gap``)."""
    gap_block = gap if gap_block is None else gap_block
    out = {}
    for kind in TAILS:
        for mixing in MIXINGS:
            a = alpha(mixing, params[kind][mixing], gap, q, gap_block).to(o.dtype)
            out[f"{kind}_{mixing}"] = te.squared_error_per_block(o, a * o_s + (1 - a) * tails[kind], block_q)
    return out
