"""Launch settings of the SLA2 Triton kernels: tile sizes, warps and pipeline stages.

Per-GPU tuning, never numerics: any :class:`LaunchConfig` computes the same attention.  It is passed
explicitly (``launch=`` of :func:`slaconv.kernels.ops.sla2_attention` and of
:func:`slaconv.kernels.sla2_triton.sla2_attention_triton`); there is no global state to rewrite.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["LaunchConfig", "DEFAULT_LAUNCH"]

_TILE_ROWS = (64, 128)
_WARPS = (1, 2, 4, 8, 16)
_STAGES = tuple(range(1, 9))


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes, warps and pipeline stages of the Triton launches: per-GPU tuning, not numerics.

    The defaults are the fastest measured on H100 and H200 at Wan2.1 shapes (the README beside this file
    lists the measurements; ``benchmarks/bench_attention.py --auto`` re-runs the sweep).  Build variants with
    ``dataclasses.replace(DEFAULT_LAUNCH, ...)``.
    """

    tile_m_fwd: int = 128
    """Query rows per program of the sparse forward launch (capped at block_q); 64 was 23% slower."""
    num_warps: int = 8
    """Warps of the sparse forward launch."""
    num_stages: int = 3
    """Pipeline stages of the sparse forward loop: 2 was 6% slower, 4 no faster."""
    lin_warps: int = 8
    """Warps of the linear launches (forward, dQ-linear, dK/dV-linear): their D x D fp32 accumulator
    spilled at 4."""
    lin_stages: int = 5
    """Stages of the linear loops: 5 gives three tile buffers (the LUT load takes a stage); 4 gives two,
    2% slower forward and 5% slower forward + backward."""
    tile_m_bwd: int = 64
    """Query rows per program of the backward and per inverted-index entry (capped at block_q)."""
    num_warps_bwd: int = 4
    """Warps of the sparse dQ and dK / dV launches."""
    num_stages_bwd: int = 2
    """Stages of the sparse dQ and dK / dV loops: 2 fits two programs per SM (forward + backward 9%
    faster than at 3)."""
    sparse_ws: int = 0
    """1: the sparse forward launch runs the warp-specialized kernel (``sla2_triton_ws.py``: TMA
    descriptors, a producer warp group and two consumer warp groups on sm_90; 4 warps asked, num_stages
    as above; 16-bit inputs and ``quant="none"`` only).  0, the default, runs ``fwd_sparse_kernel``.
    Experimental: on an H100 with Triton 3.6 it writes wrong rows (the GPU tests mark it as a known
    defect); the benchmarks keep it only as a timing of Triton's automatic split."""
    sparse_gluon: int = 2
    """1: the sparse forward launch runs the Gluon kernel (``sla2_gluon.py``: persistent programs, an explicit
    TMA producer and two ping-ponging wgmma consumer warpgroups with QK^T(j+1) overlapping softmax(j); Hopper
    GPUs, 16-bit inputs, ``quant="none"`` or ``"int8-fp8"``, 128-query and 64-key blocks; its own K/V ring
    depth), and refuses calls it does not compute.  2, the default: the Gluon kernel where it applies, the
    plain launch elsewhere (other GPUs, ``quant="int8"``, 32-bit inputs, other block sizes, and where
    ``sparse_ws`` asks for the warp-specialized one); at 97% on an H200 it makes the whole forward 18% faster
    in bf16 and 8% in ``int8-fp8``, and it computes every linear-branch option (Hedgehog features, alpha per
    query, the branch over all key blocks).  0: the plain Triton launch everywhere (:data:`PLAIN_LAUNCH`)."""
    gluon_query_features: int = 1
    """With Hedgehog features, where the Gluon sparse launch runs: 1, the default, computes phi(Q) in the launch
    (one wgmma per warpgroup on the Q tile and the head's weights, loaded into the H_rest buffer before H_rest)
    instead of the q pre-pass writing phi(Q) for the epilogue to read back (a B*H*N*D 16-bit write and read):
    0.05-0.09 ms less per forward at (1, 12, 32760, 128) on an H100.  0: the pre-pass path, as the plain launch
    always takes it."""
    block_tail_launch: int = 0
    """With ``mixing="query-block"``: 1 forms the pooled tail estimate per query block in one launch
    (``block_tail_lse_kernel``, 16 query blocks per program sharing each chunk of key-block means) after the
    LUT's selection table; 0, the default, with about 20 torch operations on the router's block means (0.081 ms
    of kernels at (1, 12, 32760, 128) on an H100, and host work that makes the eager call host-bound).  A first
    form of the launch, one program per query block, took 0.15 ms there; the grouped form has not been timed
    on a GPU yet, so it is not the default."""

    key_pass: int = 0
    """With ``linear_keys="all"``: 1 computes the key statistics the forward needs (the key blocks' means,
    H_all, z_all, mean(K), max|V|) in one launch, ``key_pass``, which reads K and V once and never writes
    phi(K); 0, the default, runs ``k_feats`` (which writes phi(K)) and ``kv_outer`` (which reads it back), the
    pair the branch over the unselected blocks needs anyway.  Not timed on a GPU yet, so not the default."""

    dkdv_gluon: int = 0
    """1: on Hopper, with 16-bit inputs, head dim 64 or 128 and 64-row query tiles and key blocks, the sparse
    parts of dK and dV run as one Gluon launch (``sla2_gluon_backward.py``: K and V in shared memory, both
    accumulators in one warpgroup, S^T and P^T computed once) instead of two ``bwd_dkdv_kernel`` launches that
    each recompute them; elsewhere the two launches.  Not timed on a GPU yet, so not the default."""
    dq_gluon: int = 0
    """1: under the conditions of ``dkdv_gluon``, the sparse part of dQ runs as the Gluon launch of the same
    module (Q and dO in shared memory, the selected K / V blocks through a TMA ring, asynchronous wgmma) instead
    of ``bwd_dq_kernel``.  Not timed on a GPU yet, so not the default."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("tile_m"):
                allowed = _TILE_ROWS
            elif f.name in ("sparse_ws", "gluon_query_features", "block_tail_launch", "key_pass", "dkdv_gluon",
                            "dq_gluon"):
                allowed = (0, 1)
            elif f.name == "sparse_gluon":
                allowed = (0, 1, 2)
            elif "warps" in f.name:
                allowed = _WARPS
            else:
                allowed = _STAGES
            if isinstance(value, bool) or value not in allowed:
                raise ValueError(f"LaunchConfig.{f.name} must be one of {tuple(allowed)}, got {value!r}")
        if self.sparse_ws and self.sparse_gluon == 1:
            raise ValueError("LaunchConfig.sparse_ws and sparse_gluon pick different sparse launches: set one")

    def as_ints(self) -> list[int]:
        """The fields in order, as the custom ops take them; :meth:`from_ints` reads them back."""
        return [getattr(self, name) for name in _LAUNCH_FIELDS]

    @classmethod
    def from_ints(cls, values) -> LaunchConfig:
        return cls(*(int(v) for v in values))


_LAUNCH_FIELDS = tuple(f.name for f in dataclasses.fields(LaunchConfig))
DEFAULT_LAUNCH = LaunchConfig()
PLAIN_LAUNCH = dataclasses.replace(DEFAULT_LAUNCH, sparse_gluon=0)
"""The default settings with the plain Triton sparse loop on every GPU: the interpretable path, and the yardstick
the Gluon launch is tested and timed against."""
