"""``InversionStrength``: the entropy / gradient-strength correlation as a torchmetrics ``Metric``.

The metric collects (entropy ``H_t``, gradient strength ``S_t``) token pairs and computes, over all of
them (all updates, all ranks), Spearman's rho (headline), Pearson's r, and the inversion strength
``-rho`` (rho < 0 is the inversion, so higher = stronger).

Why a fixed-size device buffer. Spearman needs every pair (ranks are global), so no O(1) streaming
state exists as it does for Pearson. torchmetrics' ``SpearmanCorrCoef`` keeps growing list states,
which reallocates every step and pushes data-dependent shapes through DDP. Here each rank owns two
preallocated float64 buffers of ``max_tokens`` slots and a fill count; ``update`` writes new pairs at
positions ``count + cumsum(valid) - 1`` with one ``index_put_``, so it has static shapes and never waits
for the host (no ``.item()``, no boolean indexing). Pairs past the cap are dropped and counted in
``n_dropped``. Memory: ``2 * 8 * max_tokens`` bytes per rank (1 MiB for the default 65536 tokens).

Distributed. The buffers and counts reduce with ``"cat"``: after the sync ``compute`` sees every rank's
buffer stacked ``[world, max_tokens]`` and every rank's count ``[world]``, builds the mask
``slot < count[rank]`` and correlates the union of all ranks' pairs, exactly as if one process had seen
them all. ``n_dropped``/``n_nonfinite`` reduce with ``"sum"``.

``forward`` (``full_state_update = False``) and ``merge_state`` merge a batch state into the running
state. torchmetrics' generic ``"cat"`` merge would concatenate the buffers and grow them, so
``_reduce_states`` is overridden to append the incoming valid pairs into the fixed buffers instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from corrpo.inversion.correlation import batched_pearson, batched_spearman

__all__ = ["InversionStrength"]


class InversionStrength(Metric):
    """Spearman/Pearson correlation of token entropy vs gradient strength over all collected tokens.

    Args:
        max_tokens: buffer capacity per rank; pairs beyond it are dropped (counted in ``n_dropped``).
            Memory is ``2 * 8 * max_tokens`` bytes per rank.
        **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``process_group``, ...).

    ``update(entropy, strength, mask=None)`` takes any matching shapes (``[B, T]`` or ``[N]``); only
    pairs with ``mask`` true and both values finite count (masked non-finite pairs are counted in
    ``n_nonfinite``). ``compute()`` returns a dict of 0-d tensors: ``spearman``, ``pearson``,
    ``strength`` (= ``-spearman``), ``n_tokens`` (pairs used), ``n_dropped``, ``n_nonfinite``.
    Correlations are NaN with fewer than two pairs or a constant side.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    entropy_buf: torch.Tensor
    strength_buf: torch.Tensor
    count: torch.Tensor
    n_dropped: torch.Tensor
    n_nonfinite: torch.Tensor

    def __init__(self, max_tokens: int = 65536, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = int(max_tokens)
        zeros = torch.zeros(self.max_tokens, dtype=torch.float64)
        self.add_state("entropy_buf", default=zeros.clone(), dist_reduce_fx="cat")
        self.add_state("strength_buf", default=zeros.clone(), dist_reduce_fx="cat")
        # Shape [1], not 0-d, so the local and the synced ([world, 1]) counts reshape the same way.
        self.add_state("count", default=torch.zeros(1, dtype=torch.long), dist_reduce_fx="cat")
        self.add_state("n_dropped", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_nonfinite", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, entropy: torch.Tensor, strength: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Append the valid (masked, finite) pairs of ``entropy``/``strength`` to this rank's buffers."""
        if entropy.shape != strength.shape:
            shapes = f"{tuple(entropy.shape)} and {tuple(strength.shape)}"
            raise ValueError(f"entropy and strength shapes differ: {shapes}")
        if mask is not None and mask.shape != entropy.shape:
            raise ValueError(f"mask must have shape {tuple(entropy.shape)}, got {tuple(mask.shape)}")
        device = self.entropy_buf.device
        e = entropy.detach().reshape(-1).to(device=device, dtype=torch.float64)
        s = strength.detach().reshape(-1).to(device=device, dtype=torch.float64)
        m = torch.ones_like(e, dtype=torch.bool) if mask is None else mask.reshape(-1).to(device, torch.bool)
        finite = e.isfinite() & s.isfinite()
        self.n_nonfinite += (m & ~finite).sum()
        self._append(e, s, m & finite)

    def _append(self, e: torch.Tensor, s: torch.Tensor, valid: torch.Tensor) -> None:
        """Write ``e[valid], s[valid]`` after the filled slots, in order, with static shapes.

        Valid element ``i`` goes to slot ``count + cumsum(valid)_i - 1``. Elements that are invalid or
        past the cap are sent to slot ``max_tokens - 1`` (any in-range slot would do) with value 0 and
        ``accumulate=True``: adding an exact 0 leaves every slot unchanged, while each kept pair lands
        alone in a slot still holding 0, so the write is exact. Unfilled slots thus always hold 0.
        """
        pos = self.count + valid.cumsum(0) - 1
        keep = valid & (pos < self.max_tokens)
        idx = torch.where(keep, pos, self.max_tokens - 1)
        self.entropy_buf.index_put_((idx,), torch.where(keep, e, 0.0), accumulate=True)
        self.strength_buf.index_put_((idx,), torch.where(keep, s, 0.0), accumulate=True)
        n_keep = keep.sum()
        self.count += n_keep
        self.n_dropped += valid.sum() - n_keep

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        """Merge ``incoming_state`` (the running state in ``forward``) with this one, keeping buffer sizes.

        The result holds the incoming pairs first, then this state's, up to the cap (overflow counted
        in ``n_dropped``). Used by ``forward`` and ``merge_state``.
        """
        local = {name: getattr(self, name) for name in self._defaults}
        for name in self._defaults:
            setattr(self, name, incoming_state[name].detach().to(local[name].device).clone())
        slots = torch.arange(self.max_tokens, device=self.count.device)
        self._append(local["entropy_buf"], local["strength_buf"], slots < local["count"])
        self.n_dropped += local["n_dropped"]
        self.n_nonfinite += local["n_nonfinite"]

    def compute(self) -> dict[str, torch.Tensor]:
        """Correlate all ranks' pairs: slot ``j`` of rank ``r``'s buffer is used iff ``j < count[r]``."""
        e = self.entropy_buf.reshape(-1, self.max_tokens)
        s = self.strength_buf.reshape(-1, self.max_tokens)
        counts = self.count.reshape(-1, 1)
        used = torch.arange(self.max_tokens, device=counts.device) < counts
        e, s, used = e.reshape(1, -1), s.reshape(1, -1), used.reshape(1, -1)
        spearman = batched_spearman(e, s, used)[0]
        return {
            "spearman": spearman,
            "pearson": batched_pearson(e, s, used)[0],
            "strength": -spearman,
            "n_tokens": counts.sum(),
            "n_dropped": self.n_dropped.clone(),
            "n_nonfinite": self.n_nonfinite.clone(),
        }
