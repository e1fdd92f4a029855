"""The last layer's mixture-of-experts MLP strengths in closed form, for :mod:`corrpo.inversion.strength_onepass`.

An expert stack ``W [E, out, in]`` is one logical matrix, its block diagonal (:mod:`corrpo.models.families`). In
the last layer the MoE block acts on each position alone, so the one backward of ``sum z`` gives each token's own
cotangent ``g_t`` at the experts' output (the weighted sum ``sum_k w_{t,k} expert_{e_k}(a_t)``). The routing
(``e_k``, ``w_{t,k}``) depends on ``a_t`` and the router only, not on the experts' weights, so

* ``dz_t/dW_down[e_k] = (w_{t,k} g_t) h_{t,k}^T`` with ``h_{t,k}`` the expert's gated hidden state;
* ``dz_t/dW_gate[e_k] = delta^gate_{t,k} a_t^T`` and likewise for up, ``delta`` the cotangent of the expert's
  gate/up output: one VJP of the expert's own gating (``experts._apply_gate``: SiLU-GLU, gpt-oss's clamped GLU)
  and down projection, recomputed for the routed (token, expert) pairs from the captured input and routing.

Each is rank 1 (nuclear = Frobenius = ``|delta| |a|``); the block diagonal's measure combines a token's routed
experts (:func:`~corrpo.inversion.strength_common.combine_blocks`), and other experts' blocks are exactly 0. A
shared expert (DeepSeek-V3) is one more block, an ordinary Linear whose rank-1 form is the usual one. The
recomputation reads the experts module's flags (``is_transposed``, ``has_bias``, ``has_gate``) as transformers'
own ``batched_mm`` implementation does, so it is the same computation whichever experts kernel ran the forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from corrpo.inversion.strength_common import LayerCapture, ScoringBatch, combine_blocks, rank1_measure


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    out = x @ weight if transposed else x @ weight.mT
    return out if bias is None else out + bias


def _expert_pairs(experts: nn.Module, x: Tensor, index: Tensor, weights: Tensor, g: Tensor) -> dict:
    """Per (token, routed expert) pair ``[N, k]``: the rank-1 factors' norms of gate / up / down (measure-free
    pieces: the cotangents and activations), grouped by expert as transformers does."""
    n, k = index.shape
    flat_e, flat_w = index.reshape(-1), weights.reshape(-1).to(x.dtype)
    token = torch.arange(n, device=x.device).repeat_interleave(k)
    transposed = bool(getattr(experts, "is_transposed", False))
    bias = bool(getattr(experts, "has_bias", False))
    gated = bool(getattr(experts, "has_gate", True))
    up_name = "gate_up_proj" if gated else "up_proj"
    pieces: dict[str, list] = {"token": [], "pair": [], "gate_up": [], "h": [], "down": []}
    for e in torch.unique(flat_e).tolist():
        if e >= experts.num_experts:  # a masked slot (expert parallelism's sentinel)
            continue
        pair = (flat_e == e).nonzero().squeeze(1)
        xs, ws, gs = x[token[pair]], flat_w[pair], g[token[pair]]
        up_bias = getattr(experts, f"{up_name}_bias")[e] if bias else None
        with torch.enable_grad():
            gate_up = _linear(xs, getattr(experts, up_name)[e], up_bias, transposed).detach().requires_grad_(True)
            h = experts._apply_gate(gate_up) if gated else experts.act_fn(gate_up)
            out = _linear(h, experts.down_proj[e], experts.down_proj_bias[e] if bias else None, transposed)
            (d_gate_up,) = torch.autograd.grad(out * ws[:, None], gate_up, gs)
        pieces["pair"].append(pair)
        pieces["gate_up"].append(d_gate_up)
        pieces["h"].append(h.detach())
        pieces["down"].append(gs * ws[:, None])
    order = torch.cat(pieces["pair"])
    return {
        "order": order,
        "x": x[token[order]],
        "gate_up": torch.cat(pieces["gate_up"]),
        "h": torch.cat(pieces["h"]),
        "down": torch.cat(pieces["down"]),
        "shape": (n, k),
    }


def expert_strengths(
    cap: LayerCapture, names: tuple[str, ...], grads: dict[int, Tensor], batch: ScoringBatch, measure: str
) -> dict[str, Tensor]:
    """``name -> S [N]`` for the expert matrices among ``names`` (module docstring); ``grads`` by output ``id``."""
    expert_names = [n for n in names if n in cap.proj and cap.proj[n].experts]
    if not expert_names:
        return {}
    experts = cap.proj[expert_names[0]].module
    args, out = cap.module_args(experts), cap.module_output(experts)
    seq = batch.input_ids.shape[1]
    flat = batch.rows * seq + batch.cols - 1  # the experts see [B * T, d]
    x, index, weights = args[0].detach()[flat], args[1][flat], args[2].detach()[flat]
    pairs = _expert_pairs(experts, x, index, weights, grads[id(out)].detach()[flat])
    n, k = pairs["shape"]
    result = {}
    for name in expert_names:
        proj = cap.proj[name]
        if name == "down":
            per_pair = rank1_measure(pairs["down"], pairs["h"], measure)
        else:
            delta = proj.output(pairs["gate_up"])
            per_pair = rank1_measure(delta, pairs["x"], measure)
        table = per_pair.new_zeros(n * k)
        table[pairs["order"]] = per_pair
        value = combine_blocks(table.view(n, k), measure)
        if proj.shared is not None:  # the always-on shared expert: one more block
            shared_in, shared_out = cap.module_input(proj.shared), cap.module_output(proj.shared)
            rows, pos = batch.rows, batch.cols - 1
            shared = rank1_measure(grads[id(shared_out)][rows, pos], shared_in.detach()[rows, pos], measure)
            value = combine_blocks(torch.stack([value, shared], -1), measure)
        result[name] = value
    return result
