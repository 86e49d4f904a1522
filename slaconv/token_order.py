"""Token order: which video tokens share a block of the sparse attention.

SLA2 routes whole blocks (``block_q`` queries, ``block_k`` keys of consecutive tokens).  In the raster order a
video transformer produces (frame, row, column), a 64-key block is a strip of one or two rows of one frame,
and its neighbours in space and time lie in other blocks.  With ``token_tile = (tf, th, tw)`` the converted
model regroups its tokens into tiles of tf frames x th rows x tw columns, tile after tile, so that a block is
a compact piece of the video: the attention mass a query block needs is then held by fewer key blocks (on the
quality benchmark's original at 97% sparsity, (4, 4, 4) tiles let the best 4 of 128 key blocks hold 39% of the
mass instead of 30%).

The regrouping is one permutation of the sequence, applied where the transformer builds its token sequence
and undone where it unpatchifies (together with the rotary embedding and any per-token timestep): every layer
in between is either token-wise or attention, which is permutation-equivariant, so a model in dense mode
computes exactly what the original does, and no layer pays for a gather.  A family supports it by providing
the hooks (:attr:`slaconv.families.Family.reorder_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import InputError, RecipeError

Tile = tuple[int, int, int]
_HOOKS = "_sla2_token_order_hooks"


def tile_permutation(grid: tuple[int, int, int], tile: Tile) -> torch.Tensor:
    """The sequence positions, in raster (frame, row, column) order, of the tokens of a ``grid`` = (frames,
    rows, columns) video taken tile after tile: ``order[i]`` is the raster index of the i-th token.

    Whole tiles come first, in raster order of their (frame, row, column) position, each one's tokens in raster
    order within it; a grid the tile does not divide leaves smaller tiles along its far edges, which follow in
    the same order.  Whole tiles first keeps every one of them aligned to blocks of its size (Wan 480p's 21 x 30
    x 52 grid in 4 x 4 x 4 tiles: the 2-row strips would otherwise shift every later tile by half a block).
    Nothing is padded, so any grid works."""
    frames, rows, cols = grid
    tf, th, tw = tile
    f, h, w = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    tiles_h, tiles_w = -(-rows // th), -(-cols // tw)
    tile_index = ((f // tf) * tiles_h + h // th) * tiles_w + w // tw
    within = ((f % tf) * th + h % th) * tw + w % tw
    whole = ((f // tf + 1) * tf <= frames) & ((h // th + 1) * th <= rows) & ((w // tw + 1) * tw <= cols)
    tiles = -(-frames // tf) * tiles_h * tiles_w
    key = ((~whole).long() * tiles + tile_index) * (tf * th * tw) + within
    return torch.argsort(key.reshape(-1), stable=True)


class TokenOrder:
    """The permutation of one model's current input grid, kept on the device the model runs on.

    :meth:`set_grid` is called once per forward (by the family's pre-hook); :meth:`to_tiles` and
    :meth:`to_raster` then gather along a sequence dimension.  Permutations are cached per (grid, device)."""

    def __init__(self, tile: Tile):
        self.tile = tuple(tile)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.order: torch.Tensor | None = None
        self.inverse: torch.Tensor | None = None

    def set_grid(self, grid: tuple[int, int, int], device: torch.device) -> None:
        """Select the permutation of a (frames, rows, columns) token grid."""
        key = (tuple(int(g) for g in grid), str(device))
        if key not in self._cache:
            order = tile_permutation(key[0], self.tile)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel())
            self._cache[key] = (order.to(device), inverse.to(device))
        self.order, self.inverse = self._cache[key]

    def _index(self, which: torch.Tensor | None, x: torch.Tensor, dim: int) -> torch.Tensor:
        if which is None:
            raise RuntimeError("token order used before the model's forward set its grid")
        if x.shape[dim] != which.numel():
            raise InputError(f"token order: a sequence of {x.shape[dim]} tokens where the video grid has "
                             f"{which.numel()}")
        return x.index_select(dim, which)

    def to_tiles(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``x`` with its raster-ordered sequence dimension ``dim`` in tile order."""
        return self._index(self.order, x, dim)

    def to_raster(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The inverse of :meth:`to_tiles`."""
        return self._index(self.inverse, x, dim)


ReorderHooks = Callable[[torch.nn.Module, TokenOrder], list]
"""A family's hook installer: ``reorder(model, order)`` registers the forward hooks that put the model's token
sequence in ``order`` and back, and returns their handles."""


def parse_tile(text: str) -> Tile:
    """``"4x4x4"`` (frames x rows x columns) -> (4, 4, 4); :class:`~slaconv.errors.RecipeError` otherwise."""
    parts = str(text).lower().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise RecipeError(f"token tile must be FRAMESxROWSxCOLUMNS of positive integers (e.g. 4x4x4), got {text!r}")
    return tuple(int(p) for p in parts)


def describe(tile: Tile | None) -> str:
    """``"raster"`` or ``"tiles of 4x4x4"``: the token order in words."""
    return "raster" if tile is None else "tiles of " + "x".join(map(str, tile))


def check_supported(family, tile: Tile | None) -> None:
    """:class:`~slaconv.errors.RecipeError` when ``tile`` is set and ``family`` cannot reorder its tokens."""
    if tile is not None and family.reorder_tokens is None:
        raise RecipeError(f"sla2.token_tile: the {family.name} family keeps its tokens in raster order "
                          f"(leave token_tile unset)")


def install_token_order(model: torch.nn.Module, family, tile: Tile | None) -> TokenOrder | None:
    """Regroup ``model``'s tokens into ``tile``s (None: raster order, no hooks), replacing any order installed
    before.  :class:`~slaconv.errors.RecipeError` when ``family`` cannot reorder its tokens."""
    check_supported(family, tile)  # before anything changes
    for handle in getattr(model, _HOOKS, ()):
        handle.remove()
    setattr(model, _HOOKS, [])
    if tile is None:
        return None
    order = TokenOrder(tile)
    setattr(model, _HOOKS, list(family.reorder_tokens(model, order)))
    return order
