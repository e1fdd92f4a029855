"""Inversion anatomy: the exact per-token factors of the last layer's gradient strength.

Why. The fingerprint is one number, Spearman(H_t, S_t). Its sign is set by which per-token factor of
``S_t`` moves with the entropy ``H_t``; this module writes ``S_t`` of the last layer's rank-1 projections as an
exact product of such factors, so each can be correlated with ``H_t`` on its own.

The final norm. Let ``h_t`` be the residual stream entering the final norm at the position that scores token
``y`` (``w_y``: its unembedding row, ``gamma``: the norm's gain; Gemma's ``(1 + w)``). For RMSNorm,
``n(h) = gamma * h / r`` with ``r = sqrt(mean(h^2) + eps)``, and the raw logit ``l = <n(h), w_y> (+ b_y)`` has

    dl/dh = (1/r) (u - c h),   u = gamma * w_y,   c = <u, h> / (d r^2),

i.e. ``(1/r) P_perp(h) u`` up to ``eps`` (``d r^2 = |h|^2 + d eps``). So, exactly,

    |dz/dh_t| = logit_slope * inv_rms * w_norm * sin,

* ``inv_rms`` = ``1 / r``: a small residual stream amplifies every gradient through it;
* ``w_norm`` = ``|gamma * w_y|``: how large the chosen token's (gain-weighted) unembedding is;
* ``sin`` = ``|u - c h| / |u|``: the sine of the angle between ``u`` and ``h`` (its ``eps``-exact form). At a
  confident token ``h`` points along ``u`` and the norm cancels that direction: ``sin`` -> 0, a SMALL gradient
  at LOW entropy -- the geometry behind a positive rho;
* ``logit_slope`` = ``dz/dl``: the family's logit map (1; Gemma 2/3 soft-capping ``1 - tanh^2(l / c)``; Granite
  ``1 / logits_scaling``);
* ``dz_dh`` = the product, ``|dz/dh_t|``.

LayerNorm (GPT-2, GPT-NeoX) also centres: with ``C`` the centring projection, ``dl/dh = (1/r)(C u - c h~)`` for
the centred ``h~ = C h`` and ``c = <u, h~> / (d r^2)``, so the same factors hold with ``u`` -> ``C u``
(``w_norm`` = ``|C(gamma * w_y)|``) and ``h`` -> ``h~``.

The path. ``g_t = dz/d(o_t)``, the cotangent at the last attention's O-projection output, reaches ``h_t`` through
the residual (identity) and the MLP (``g_t = dz/dh_t + J_mlp^T dz/dh_t`` in a pre-norm block):

* ``path_gain`` = ``|g_t| / |dz/dh_t|`` (1 = the residual alone; NaN where ``dz/dh_t = 0``);
* ``mlp_path`` = ``|g_t - dz/dh_t| / |dz/dh_t|``: the MLP branch's share. In families whose residual is not the
  identity (post-norms: Gemma 2/3, OLMo 2; Granite's residual multiplier) it reads as the departure from it.

The rank-1 projections. For each last-layer projection whose per-token gradient is the outer product
``delta_t a_t^T`` (q, o, gate, up, down; :mod:`corrpo.inversion.strength_onepass`): ``<p>_grad`` = ``|delta_t|``
(the cotangent at its output) and ``<p>_act`` = ``|a_t|`` (its input); their product is that matrix's nuclear
(= Frobenius) strength. For O: ``o_grad = |g_t| = dz_dh * path_gain``, so the O strength is
``logit_slope * inv_rms * w_norm * sin * path_gain * o_act``, every factor exact.

All factors come from one forward and one backward of ``sum_t z_t`` (after the last attention everything is
position-wise, so that backward holds each token's own cotangent; see ``strength_onepass``). The final-norm
factors are the closed form above; the tests compare their product with autograd's ``|dz/dh_t|``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from corrpo.inversion.strength_common import LayerCapture, ScoringBatch, forward_hidden_and_z, scoring_mode
from corrpo.models.architectures import DecoderParts, decoder_parts

NORM_FACTORS = ("inv_rms", "w_norm", "sin", "logit_slope", "dz_dh")
PATH_FACTORS = ("path_gain", "mlp_path")
RANK1_PROJECTIONS = ("q", "o", "gate", "up", "down")


def rank1_names(parts: DecoderParts) -> list[str]:
    """The family's rank-1 matrices with one module output each: an expert stack (MoE) has one per routed expert,
    so its factors are left out."""
    slots = parts.layout.slots
    return [p for p in RANK1_PROJECTIONS if p in slots and not slots[p].experts]


def anatomy_factor_names(parts: DecoderParts) -> tuple[str, ...]:
    """Every factor :func:`token_anatomy` returns for this family, in a fixed order."""
    rank1 = [f"{p}_{side}" for p in rank1_names(parts) for side in ("grad", "act")]
    return (*NORM_FACTORS, *PATH_FACTORS, *rank1)


def _centre(x: Tensor) -> Tensor:
    return x - x.mean(-1, keepdim=True)


def norm_logit_gradient(h: Tensor, u: Tensor, eps: float, centred: bool = False) -> Tensor:
    """``dl/dh = (1/r)(u - c h)`` of ``l = <n(h), w_y>`` (module docstring), rows ``[N, d]``, fp64.

    ``h``: the final norm's input; ``u``: ``gamma * w_y``; ``centred``: LayerNorm (``C u`` and ``h~ = C h``).
    """
    h, u = h.double(), u.double()
    if centred:
        h, u = _centre(h), _centre(u)
    ms = h.square().mean(-1, keepdim=True) + eps  # r^2
    c = (u * h).sum(-1, keepdim=True) / (h.shape[-1] * ms)
    return ms.rsqrt() * (u - c * h)


def final_norm_factors(h: Tensor, u: Tensor, eps: float, centred: bool = False) -> dict[str, Tensor]:
    """``inv_rms``, ``w_norm``, ``sin`` with ``inv_rms * w_norm * sin = |dl/dh|`` exactly, ``[N, d]`` -> ``[N]``.

    ``sin = |u - c h| / |u|`` is the exact (``eps``-aware) sine of the angle between ``u`` and ``h``.
    """
    hc, uc = (_centre(h.double()), _centre(u.double())) if centred else (h.double(), u.double())
    inv_rms = (hc.square().mean(-1) + eps).rsqrt()
    w_norm = uc.norm(dim=-1)
    grad = norm_logit_gradient(h, u, eps, centred).norm(dim=-1)
    sin = grad / (inv_rms * w_norm).clamp_min(torch.finfo(torch.float64).tiny)
    return {"inv_rms": inv_rms.float(), "w_norm": w_norm.float(), "sin": sin.float()}


@dataclass(frozen=True)
class FinalNorm:
    """A family's final norm as the closed form needs it: gain ``gamma``, bias, ``eps``, centring (LayerNorm)."""

    gamma: Tensor
    bias: Tensor | None
    eps: float
    centred: bool

    def __call__(self, h: Tensor) -> Tensor:
        """``gamma * h~ / r (+ bias)``: the closed form, checked against the module's own output."""
        h = h.double()
        if self.centred:
            h = h - h.mean(-1, keepdim=True)
        out = self.gamma.double() * h * (h.square().mean(-1, keepdim=True) + self.eps).rsqrt()
        return out if self.bias is None else out + self.bias.double()


def final_norm(parts: DecoderParts) -> tuple[nn.Module, FinalNorm]:
    """The final norm module and its closed form; ValueError naming the family when it has none we can read."""
    name = parts.layout.final_norm
    module = getattr(parts.base, name, None) if name else None
    if not isinstance(module, nn.Module):
        raise ValueError(f"inversion anatomy: the {parts.layout.name} family has no final norm (decoder.{name})")
    weight = getattr(module, "weight", None)
    d = parts.unembed.weight.shape[-1]
    gamma = torch.ones(d, device=parts.unembed.weight.device) if weight is None else weight.detach()
    if isinstance(module, nn.LayerNorm):
        bias = None if module.bias is None else module.bias.detach()
        return module, FinalNorm(gamma, bias, float(module.eps), centred=True)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:
        raise ValueError(
            f"inversion anatomy: the {parts.layout.name} final norm {type(module).__name__} is neither a LayerNorm "
            "nor an RMSNorm with variance_epsilon / eps"
        )
    if "Gemma" in type(module).__name__:  # Gemma's RMSNorm scales by (1 + weight)
        gamma = 1.0 + gamma
    return module, FinalNorm(gamma, None, float(eps), centred=False)


def _check_closed_form(parts: DecoderParts, closed: FinalNorm, h: Tensor, out: Tensor) -> None:
    got, ref = closed(h), out.detach().double()
    if not torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()):
        raise ValueError(
            f"inversion anatomy: the {parts.layout.name} final norm is not gamma * h / rms(h) (+ centring): "
            "add its closed form to corrpo/inversion/anatomy.py"
        )


def token_anatomy(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, token_mask: Tensor
) -> dict[str, Tensor]:
    """Every factor of :func:`anatomy_factor_names` per token, ``[B, T]`` fp32, NaN where not scored.

    Scored tokens are those of :class:`~corrpo.inversion.strength_common.ScoringBatch` (as for the strength).
    """
    parts = decoder_parts(model)
    norm_module, closed = final_norm(parts)
    layer = parts.layers[len(parts.layers) - 1]
    with torch.inference_mode(False):
        batch = ScoringBatch.build(input_ids.clone(), None if attention_mask is None else attention_mask.clone(),
                                   token_mask.clone())  # fmt: skip
        cap = LayerCapture(parts, layer)
        seen: dict[str, Tensor] = {}
        handle = norm_module.register_forward_hook(lambda _m, args, out: seen.update(h=args[0], out=out))
        names = rank1_names(parts)
        weights = list({id(p.weight): p.weight for p in cap.proj.values()}.values())
        try:
            with scoring_mode(model, weights):
                _, z = forward_hidden_and_z(parts, batch)
                outputs = {id(cap.full_output(n)): cap.full_output(n) for n in names}
                grads = dict(zip(outputs, torch.autograd.grad(z.sum(), list(outputs.values())), strict=True))
        finally:
            cap.remove()
            handle.remove()
        factors = _factors(parts, closed, cap, seen, grads, batch, names)
    return {k: batch.scatter(v) for k, v in factors.items()}


def _factors(parts, closed, cap, seen, grads, batch: ScoringBatch, names) -> dict[str, Tensor]:
    rows, pos = batch.rows, batch.cols - 1
    targets = batch.input_ids[batch.rows, batch.cols]
    h = seen["h"].detach()[rows, pos]
    _check_closed_form(parts, closed, h, seen["out"][rows, pos])
    u = closed.gamma.double() * parts.unembed.weight.detach()[targets].double()
    out = final_norm_factors(h, u, closed.eps, closed.centred)
    raw = (closed(h) * parts.unembed.weight.detach()[targets].double()).sum(-1)
    if parts.unembed.bias is not None:
        raw = raw + parts.unembed.bias.detach()[targets].double()
    with torch.enable_grad():  # the logit map is element-wise: the gradient of its sum is each slope
        raw = raw.requires_grad_(True)
        (slope,) = torch.autograd.grad(parts.logit_map(raw).sum(), raw)
    out["logit_slope"] = slope.abs().float()
    dz_dh = slope.abs() * out["inv_rms"].double() * out["w_norm"].double() * out["sin"].double()
    out["dz_dh"] = dz_dh.float()
    grad_h = slope[:, None] * norm_logit_gradient(h, u, closed.eps, closed.centred)  # dz/dh_t, for the MLP branch
    for name in names:
        delta = cap.proj[name].output(grads[id(cap.full_output(name))])[rows, pos].double()
        out[f"{name}_grad"] = delta.norm(dim=-1).float()
        out[f"{name}_act"] = cap.input(name).detach()[rows, pos].double().norm(dim=-1).float()
        if name == "o":  # undefined (NaN) where dz/dh_t = 0, e.g. a padding token's zero unembedding row
            denom = torch.where(dz_dh > 0, dz_dh, torch.nan)
            out["path_gain"] = (delta.norm(dim=-1) / denom).float()
            out["mlp_path"] = ((delta - grad_h).norm(dim=-1) / denom).float()
    order = anatomy_factor_names(parts)
    return {k: out[k] for k in order}
