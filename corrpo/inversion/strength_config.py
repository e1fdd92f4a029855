"""Options of the per-token logit-gradient strength (what to measure, on which weights, how)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MEASURES = ("nuclear", "frobenius", "l1")
METHODS = ("loop", "onepass", "vmap", "sketch")
PROJECTIONS = ("q", "k", "v", "o", "mlp")


@dataclass
class StrengthConfig:
    """How ``S_j`` is computed.

    Attributes:
        measure: matrix norm of each per-token gradient ``G = dz_j/dW``: ``"nuclear"`` (sum of singular
            values, the paper's headline), ``"frobenius"`` or ``"l1"`` (sum of ``|G|``, the author's earlier
            variant).
        layers: ``"last"`` (default; the paper's "output layer"), ``"all"``, or a list of layer indices
            (negative allowed).
        projections: which matrices of each selected layer: any of ``"q", "k", "v", "o"`` (default all four)
            and ``"mlp"`` (= gate, up and down weights). Weights only: biases (Qwen2 q/k/v) are ignored.
        method: ``"loop"`` one backward per token (the reference), ``"onepass"`` exact closed forms from
            ONE backward (last layer only), ``"vmap"`` batched per-token VJPs (exact, any layers),
            ``"sketch"`` an unbiased estimate of every token's squared Frobenius norm from ``sketch_dim``
            forward-mode JVPs per matrix (``measure="frobenius"`` only; any layers; cost independent of the
            number of tokens).
        chunk_size: tokens per batched VJP (vmap) / per closed-form block (onepass) / directions per batched JVP
            (sketch); bounds memory.
        sketch_dim: random sign directions per matrix (``sketch``); relative std of each squared-norm estimate
            is at most ``sqrt(2 / sketch_dim)``.
        sketch_seed: seed of those directions: a fixed seed gives the same estimate for the same model and probe.

    ``S_j`` is the MEAN of the per-matrix measures over all selected matrices: the paper does not publish how
    the Q/K/V/O (or per-layer) norms are combined, so we average them and say so.
    """

    measure: str = "nuclear"
    layers: str | Sequence[int] = "last"
    projections: Sequence[str] = ("q", "k", "v", "o")
    method: str = "onepass"
    chunk_size: int = 64
    sketch_dim: int = 32
    sketch_seed: int = 0

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ValueError(f"unknown measure {self.measure!r}; expected one of {MEASURES}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if isinstance(self.layers, str):
            if self.layers not in ("last", "all"):
                raise ValueError(f"layers must be 'last', 'all' or a list of ints, got {self.layers!r}")
        else:
            layers = tuple(self.layers)
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ValueError(f"layers must be 'last', 'all' or a non-empty list of ints, got {self.layers!r}")
            self.layers = layers
        if isinstance(self.projections, str):
            self.projections = (self.projections,)
        projections = tuple(self.projections)
        bad = [p for p in projections if p not in PROJECTIONS]
        if not projections or bad or len(set(projections)) != len(projections):
            raise ValueError(
                f"projections must be a non-empty, duplicate-free subset of {PROJECTIONS}, got {self.projections!r}"
            )
        self.projections = projections
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")
        if isinstance(self.sketch_dim, bool) or not isinstance(self.sketch_dim, int) or self.sketch_dim < 1:
            raise ValueError(f"sketch_dim must be a positive int, got {self.sketch_dim!r}")
        if isinstance(self.sketch_seed, bool) or not isinstance(self.sketch_seed, int) or self.sketch_seed < 0:
            raise ValueError(f"sketch_seed must be a non-negative int, got {self.sketch_seed!r}")
        if self.method == "sketch" and self.measure != "frobenius":
            raise ValueError(
                "method='sketch' estimates squared Frobenius norms only: set measure='frobenius' "
                f"(got {self.measure!r})"
            )
        if self.method == "onepass" and self.layers == "all":
            raise ValueError(
                "method='onepass' is exact only for the LAST layer (layers='last' or [-1]); "
                "use method='vmap' (or 'loop') for layers='all'"
            )
