"""The gradient-strength spec: what ``S_t`` measures, on which weights, and how. Declared once, here.

Every user of a strength (the :class:`callbacks.inversion.InversionTracker`, the CorR-PO reward term
``rl.inversion``, ``corrpo validate``, the benchmarks) nests this one dataclass as ``strength: {...}``, so a
field, its default and its validation exist in exactly one place. The only default that differs between users is
the reward term's ``projections`` (see :data:`REWARD_STRENGTH_DEFAULTS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

MEASURES = ("nuclear", "frobenius", "l1")
METHODS = ("loop", "onepass", "vmap", "sketch")
PROJECTIONS = ("q", "k", "v", "o", "mlp")
K_SOLVERS = ("auto", "eigh", "batched")


@dataclass
class StrengthConfig:
    """How ``S_t`` is computed: ``S_t = mean_W measure(dz_{t,y_t} / dW)`` over the selected matrices ``W``.

    ``S_t`` is the MEAN of the per-matrix measures over all selected matrices: the paper does not publish how
    the Q/K/V/O (or per-layer) norms are combined, so we average them and say so.
    """

    measure: str = "nuclear"
    """Matrix norm of each per-token gradient ``G = dz/dW``: ``nuclear`` (sum of singular values, the paper's
    headline), ``frobenius``, or ``l1`` (sum of ``|G|``, the author's earlier variant)."""
    layers: str | list[int] = "last"
    """``last`` (the paper's "output layer"), ``all``, or a list of layer indices (negative allowed)."""
    projections: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    """Matrices of each selected layer: any of ``q, k, v, o`` and ``mlp`` (= the MLP weights: gate, up and down, or up
    and down in GPT-2 and GPT-NeoX). Weights only:
    biases (Qwen2's q/k/v) are ignored."""
    method: str = "onepass"
    """``loop`` (one backward per token, the reference), ``onepass`` (exact closed forms from ONE backward, last
    layer only), ``vmap`` (batched per-token VJPs, exact, any layers), ``sketch`` (an unbiased estimate of each
    token's squared Frobenius norm from ``sketch_dim`` forward-mode JVPs per matrix; cost independent of T)."""
    chunk_size: int = 64
    """Tokens per batched VJP (vmap) / per closed-form block (onepass) / directions per batched JVP (sketch):
    bounds memory."""
    sketch_dim: int = 32
    """``sketch``: random sign directions per matrix; each squared-norm estimate has relative std at most
    ``sqrt(2 / sketch_dim)``."""
    sketch_seed: int = 0
    """``sketch``: seed of those directions (the same seed gives the same estimate for the same model and probe)."""
    k_solver: str = "auto"
    """``onepass``: the eigen-solver of W_k's nuclear norm (``corrpo.inversion.psd_root``): ``eigh`` (LAPACK /
    cuSOLVER, one matrix at a time: the reference), ``batched`` (Newton-Schulz square root in batched matmuls,
    relative error <= 1e-4 by its bound), ``auto`` (``batched`` on CUDA, ``eigh`` elsewhere)."""

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
        for key in ("chunk_size", "sketch_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        if isinstance(self.sketch_seed, bool) or not isinstance(self.sketch_seed, int) or self.sketch_seed < 0:
            raise ValueError(f"sketch_seed must be a non-negative int, got {self.sketch_seed!r}")
        if self.k_solver not in K_SOLVERS:
            raise ValueError(f"unknown k_solver {self.k_solver!r}; expected one of {K_SOLVERS}")
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


REWARD_STRENGTH_DEFAULTS: dict = {"projections": ["q", "v", "o"]}
"""Where ``rl.inversion.strength`` departs from :class:`StrengthConfig`'s defaults, and only there.

Without K: the per-token K closed form costs ``O(T^2 d)`` plus an eigen-solve per token, which on the tiny CPU
config makes a CorR-PO step ~1.8x a GRPO step instead of ~1.2x. The tracker keeps all four (the paper's set);
``rl.inversion.strength.projections: [q, k, v, o]`` restores it for the reward too.
"""


def strength_spec(value: StrengthConfig | Mapping | None, key: str, defaults: Mapping | None = None) -> StrengthConfig:
    """``value`` as a :class:`StrengthConfig`: itself, or built from a mapping over ``defaults``; errors name ``key``.

    A mapping (a YAML section given in Python, or a checkpoint's saved dict) fills its missing fields from
    ``defaults`` first, then from the dataclass, so a partial override keeps the owner's defaults.
    """
    if isinstance(value, StrengthConfig):
        return value
    given = dict(defaults or {}) | dict(value or {})
    unknown = sorted(set(given) - {f.name for f in fields(StrengthConfig)})
    if unknown:
        raise ValueError(f"{key}: unknown field(s) {unknown}; expected {[f.name for f in fields(StrengthConfig)]}")
    try:
        return StrengthConfig(**given)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{key}: {error}") from None
