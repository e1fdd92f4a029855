"""Pieces every strength method shares: the scored-token index, the forward, the grad-state guard, norms.

The forward runs the base decoder (``model.model``, ``model.transformer``, ...: the family layout) with
``position_ids = cumsum(attention_mask) - 1`` so left padding is exact, and forms the raw logit of each
scored token directly from the final hidden state: ``z_j = <h_{j-1}, W_U[y_j]> (+ b_U[y_j])`` -- the very
number ``model(...).logits[b, j-1, y_j]`` holds, in fp32, but without materialising a ``[B, T, V]`` logits
tensor in the autograd graph (a 150k vocabulary would otherwise cost a ``[B, T, V]`` gradient buffer per
backward). The family's logit map is applied to that number (Gemma 2/3: ``c tanh(z / c)``; Granite:
``z / logits_scaling``), so ``z`` is the logit the model outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from corrpo.inversion.psd_root import gram_nuclear
from corrpo.models.architectures import DecoderParts, Matrix, Projection, projection
from corrpo.models.forward import eval_mode, padded_logits, position_ids_from_mask


def effective_scored_mask(attention_mask: Tensor, token_mask: Tensor) -> Tensor:
    """Scored token positions ``[B, T]`` bool: ``token_mask`` AND ``j >= 1`` AND tokens ``j-1``, ``j`` real.

    A token whose predecessor is padding has no real prediction to score, so it is dropped (NaN output).
    """
    if token_mask.shape != attention_mask.shape:
        raise ValueError(
            f"token_mask {tuple(token_mask.shape)} must match attention_mask {tuple(attention_mask.shape)}"
        )
    real = attention_mask.bool()
    mask = token_mask.bool() & real
    mask[:, 0] = False
    mask[:, 1:] &= real[:, :-1]
    return mask


@dataclass
class ScoringBatch:
    """A batch plus the flat index of its ``N`` scored tokens (``rows[n]``, token ``cols[n]``)."""

    input_ids: Tensor
    attention_mask: Tensor
    mask: Tensor
    rows: Tensor
    cols: Tensor
    segments: Tensor | None = None
    """Packed rows (:mod:`corrpo.models.packing`): ``[B, T]`` the sequence each position belongs to; a token attends
    only to earlier positions of its own segment. None: each row is one sequence."""

    @classmethod
    def build(
        cls, input_ids: Tensor, attention_mask: Tensor | None, token_mask: Tensor, segments: Tensor | None = None
    ) -> ScoringBatch:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = effective_scored_mask(attention_mask.to(input_ids.device), token_mask.to(input_ids.device))
        if segments is not None:  # the predecessor of a scored token must be of its own sequence
            mask[:, 1:] &= segments[:, 1:] == segments[:, :-1]
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(input_ids, attention_mask.to(input_ids.device), mask, rows, cols, segments)

    @property
    def num_scored(self) -> int:
        return int(self.rows.numel())

    def scatter(self, values: Tensor) -> Tensor:
        """Place per-token values ``[N]`` into a ``[B, T]`` fp32 tensor, NaN at unscored positions."""
        out = torch.full(self.mask.shape, float("nan"), dtype=torch.float32, device=self.mask.device)
        out[self.rows, self.cols] = values.to(out.device, torch.float32)
        return out


def forward_hidden_and_z(parts: DecoderParts, batch: ScoringBatch) -> tuple[Tensor, Tensor]:
    """Final-normed hidden states ``[B, T, d]`` and the raw logits ``z [N]`` (fp32; fp64 for an fp64 model)."""
    out = parts.base(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids_from_mask(batch.attention_mask),
        use_cache=False,
    )
    hidden = out.last_hidden_state
    targets = batch.input_ids[batch.rows, batch.cols]
    return hidden, chosen_logits(parts, hidden[batch.rows, batch.cols - 1], targets)


def chosen_logits(parts: DecoderParts, h: Tensor, targets: Tensor) -> Tensor:
    """The raw logits ``z [N] = logit_map(h . W[y] + b[y])`` of tokens ``targets [N]`` at final-normed hidden
    states ``h [N, d]`` (fp32; fp64 for an fp64 model): the model's own logit of each chosen token, without the
    vocabulary-wide product. Why: ``dz/dh`` is then the chosen token's unembedding row itself -- what the
    backward of ``logits[..., y]`` computes as a one-hot ``[N, V]`` cotangent times ``W`` (exactly: one nonzero
    product per element) -- so a backward of ``sum z`` costs no ``[N, V]`` buffer and no ``N x V x d`` product.
    """
    dtype = torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 for an fp64 reference
    z = (h.to(dtype) * parts.unembed.weight[targets].to(dtype)).sum(-1)
    if parts.unembed.bias is not None:
        z = z + parts.unembed.bias[targets].to(dtype)
    return parts.logit_map(z)


def check_generic_logits(model: nn.Module, parts: DecoderParts, batch: ScoringBatch) -> None:
    """For a GENERIC layout only: ValueError unless ``z`` equals the model's own ``logits[b, j-1, y_j]``.

    A listed family's logit path is read from its source (and tested); an unlisted one's is guessed from
    ``get_decoder()`` / ``get_output_embeddings()``, so it is checked on the batch at the cost of one
    no-grad forward.
    """
    if not parts.layout.name.startswith("generic:") or batch.num_scored == 0:
        return
    with torch.no_grad():
        _, z = forward_hidden_and_z(parts, batch)
        ids, mask = batch.input_ids, batch.attention_mask
        logits = padded_logits(model, ids, mask)
        ref = logits[batch.rows, batch.cols - 1, ids[batch.rows, batch.cols]].float()
    tol = 1e-3 if logits.dtype in (torch.float32, torch.float64) else 5e-2  # bf16/fp16 logits: 8-11 mantissa bits
    if not torch.allclose(z.float(), ref, rtol=tol, atol=tol * ref.abs().max().item()):
        raise ValueError(
            f"gradient strength: {type(model).__name__} is not a listed family and its logits are not "
            "unembed(get_decoder()(...)); add its layout to corrpo/models/families.py"
        )


def checkpointed_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` with gradient checkpointing on (transformers sets ``gradient_checkpointing``)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


@contextmanager
def scoring_mode(model: nn.Module, grad_params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Eval mode, grad enabled, ``requires_grad`` ONLY on ``grad_params``, gradient checkpointing off; everything
    restored on exit.

    Checkpointing (``model.gradient_checkpointing``) would re-run layers inside the backward, firing the onepass
    forward hooks a second time and the per-token backwards through recomputation: scoring is its own forward
    and keeps its activations (a last-layer score holds one layer's), so it is off here whatever the model's mode.

    Turning ``requires_grad`` off elsewhere makes the autograd graph start at the first selected weight (a
    last-layer score never stores activations of earlier layers) and lets frozen models be scored. No
    ``.grad`` is ever written: the methods use ``torch.autograd.grad``.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    wanted = {id(p) for p in grad_params}
    checkpointed = checkpointed_modules(model)
    with eval_mode(model):
        try:
            for module in checkpointed:
                module.gradient_checkpointing = False
            for p in params:
                p.requires_grad_(id(p) in wanted)
            with torch.enable_grad():
                yield
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
            for module in checkpointed:
                module.gradient_checkpointing = True


def nuclear_norm(g: Tensor, solver: str = "eigh", rank: int | None = None) -> Tensor:
    """``||G||_* = sum_i sigma_i = sum_i sqrt(lambda_i(G G^T))`` over the smaller Gram matrix, in fp64.

    A symmetric eigen-solve of the ``min(m, n)``-square Gram matrix is about 2.4x faster than an SVD of
    ``G`` on the per-token K/V gradients (64 x 128 for the tiny model). Forming the Gram matrix squares the
    condition number, so it is done in fp64: eigenvalue noise is then ~1e-16 ||G||^2, i.e. ~1e-8 ||G|| per
    singular value after the square root, far below the 1e-4 agreement the tests demand. ``solver`` / ``rank``:
    :func:`corrpo.inversion.psd_root.gram_nuclear`'s (``eigh``, the reference, or the batched root).
    """
    g64 = g.double()
    return gram_nuclear(g64 @ g64.mT if g.shape[-2] <= g.shape[-1] else g64.mT @ g64, solver, rank)


def matrix_measure(grad: Tensor, measure: str) -> Tensor:
    """Norm of (a batch of) gradient matrices ``[..., m, n]`` -> ``[...]`` fp32."""
    g = grad.float()
    if measure == "nuclear":
        return nuclear_norm(g)
    if measure == "frobenius":
        return torch.linalg.matrix_norm(g, ord="fro")
    if measure == "l1":
        return g.abs().sum((-2, -1))
    raise ValueError(f"unknown measure {measure!r}")


def combine_blocks(values: Tensor, measure: str, dim: int = -1) -> Tensor:
    """The measure of a block-diagonal matrix from its blocks' measures along ``dim`` (an expert stack, a shared
    expert: :mod:`corrpo.models.families`): its singular values and entries are the blocks', so nuclear and l1 add
    up and Frobenius is the root of the summed squares."""
    if measure == "frobenius":
        return values.square().sum(dim).sqrt()
    return values.sum(dim)


def logical_measure(matrix: Matrix, grads: dict[int, Tensor], measure: str) -> Tensor:
    """``measure(dz/dW)`` ``[...]`` of one logical matrix from its stored parameters' gradients (by ``id``): a fused
    block's rows, an expert stack's block diagonal, a shared expert's block (:func:`combine_blocks`)."""
    values = []
    for block in (matrix, *matrix.also):
        value = matrix_measure(block.gradient(grads[id(block.weight)]), measure)
        values.append(combine_blocks(value, measure) if block.experts else value)
    return values[0] if len(values) == 1 else combine_blocks(torch.stack(values, -1), measure)


def rank1_measure(delta: Tensor, act: Tensor, measure: str) -> Tensor:
    """Norm of the outer products ``delta_n act_n^T`` without forming them.

    A rank-1 matrix has one singular value ``|delta| |act|``, so nuclear = Frobenius = that product, and
    ``sum |delta_i act_k| = |delta|_1 |act|_1``.
    """
    d, a = delta.float(), act.float()
    if measure in ("nuclear", "frobenius"):
        return d.norm(dim=-1) * a.norm(dim=-1)
    if measure == "l1":
        return d.abs().sum(-1) * a.abs().sum(-1)
    raise ValueError(f"unknown measure {measure!r}")


def max_relative_error(values: Tensor, reference: Tensor, floor: float = 1e-2) -> float:
    """Max over finite entries of ``|values - ref| / max(|ref|, floor * max|ref|)``.

    The floor guards tokens whose exact value is 0 (e.g. q/k gradients at a sequence's first real position,
    where the attention row has a single key and the softmax Jacobian vanishes): there the reference holds
    only rounding noise and a pure relative error is meaningless.
    """
    fin = torch.isfinite(reference)
    if not torch.equal(fin, torch.isfinite(values)):
        raise ValueError("values and reference are finite at different positions")
    if not fin.any():
        return 0.0
    ref, val = reference[fin].double(), values[fin].double()
    denom = ref.abs().clamp(min=floor * ref.abs().max().item())
    return ((val - ref).abs() / denom.clamp(min=torch.finfo(torch.float64).tiny)).max().item()


class LayerCapture:
    """Forward hooks keeping the input and output of each last-layer projection module and the RoPE cos/sin (and an
    experts module's routing arguments, and a shared expert's Linears)."""

    def __init__(self, parts: DecoderParts, layer: nn.Module) -> None:
        self.proj: dict[str, Projection] = {n: projection(parts, layer, n) for n in parts.layout.slots}
        self.io: dict[int, tuple[Tensor, Tensor]] = {}
        self.args: dict[int, tuple[Tensor, ...]] = {}
        self.rope: tuple[Tensor, Tensor] | None = None
        self._handles = []
        modules = [m for p in self.proj.values() for m in (p.module, p.shared) if m is not None]
        attn = getattr(layer, parts.layout.attention)
        if parts.layout.mla:  # the keys' RoPE part (strength_mla)
            modules.append(attn.kv_a_proj_with_mqa)
        for module in {id(m): m for m in modules}.values():
            self._handles.append(module.register_forward_hook(self._hook))
        self._handles.append(attn.register_forward_pre_hook(self._attn_hook, with_kwargs=True))

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.io[id(module)] = (inputs[0], output)
        self.args[id(module)] = inputs

    def _attn_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.rope = kwargs.get("position_embeddings")

    def input(self, name: str) -> Tensor:
        return self.io[id(self.proj[name].module)][0]

    def full_output(self, name: str) -> Tensor:
        return self.io[id(self.proj[name].module)][1]

    def output(self, name: str) -> Tensor:
        return self.proj[name].output(self.full_output(name))

    def module_input(self, module: nn.Module) -> Tensor:
        return self.io[id(module)][0]

    def module_output(self, module: nn.Module) -> Tensor:
        return self.io[id(module)][1]

    def module_args(self, module: nn.Module) -> tuple[Tensor, ...]:
        return self.args[id(module)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
