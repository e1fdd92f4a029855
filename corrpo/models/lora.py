"""LoRA adapters through PEFT (``model.lora``): what trains, the KL reference, the exported folder.

With ``model.lora: {r: 8, alpha: 16}`` every targeted projection ``W`` (``d_out x d_in``) becomes

    W_eff = W + (alpha / r) B A,    A: r x d_in (random init),  B: d_out x r (zero init),

so the policy starts exactly as the base model and only ``A``, ``B`` receive gradients and optimizer state
(``CorrPOModule.configure_optimizers`` keeps parameters with ``requires_grad`` only; the base is frozen).

- KL reference (``rl.beta > 0``): a second copy wrapped the same way and refreshed from the policy's state
  dict at the SFT -> RL boundary, exactly as without LoRA. PEFT's ``disable_adapter()`` would give the
  *base* model, which is the policy as RL starts only when there was no SFT phase (adapters trained by SFT
  belong to the reference), so it is not used.
- Export (:func:`corrpo.models.loading.export_policy`): ``<run>/policy`` holds the adapters MERGED into a copy of the
  base (``merge_and_unload``), a plain ``from_pretrained`` folder; ``<run>/policy/adapter`` holds the adapters
  alone (``PeftModel.from_pretrained(base, folder)``).
- Inversion: the gradient strength is measured on ``W_eff`` (see ``docs/inversion.md``):
  ``dz/dW_eff = delta x^T`` is the gradient w.r.t. the base weight of the wrapped layer.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from corrpo.models.finite import require_finite_fields

INSTALL_HINT = 'LoRA needs PEFT: pip install "corrpo[lora]"'
# PEFT 0.21 calls transformers 5's deprecated ``is_gradient_checkpointing``: noise, not ours to fix
_PEFT_DEPRECATION = ".*is_gradient_checkpointing"


@dataclass
class LoRAConfig:
    """``model.lora``: LoRA adapters on the policy (unset = full fine-tuning)."""

    r: int = 8
    """Adapter rank."""
    alpha: float = 16.0
    """Scale numerator: the update is ``(alpha / r) B A``."""
    dropout: float = 0.0
    """Dropout on the adapter input during training (off while scoring the inversion)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that get adapters (Qwen2/Llama: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)."""

    def __post_init__(self) -> None:
        require_finite_fields(self, "model.lora")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"model.lora.r must be a positive int, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise ValueError(f"model.lora.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"model.lora.target_modules must be a non-empty list of names, got {self.target_modules}")
        if "lm_head" in self.target_modules:
            raise ValueError("model.lora.target_modules: lm_head is not supported (the inversion reads its weight)")


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError(f"model.lora is set but peft is not installed. {INSTALL_HINT}") from err
    return peft


def is_peft_model(model: nn.Module) -> bool:
    """True for a PEFT wrapper (``PeftModel``); checked by class name so that PEFT stays optional."""
    return any(cls.__name__ == "PeftModel" for cls in type(model).__mro__)


def apply_lora(model: nn.Module, config: LoRAConfig, seed: int = 0) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (in place: the base modules are reused); returns the ``PeftModel``.

    ``A`` is initialised from ``seed`` in a forked RNG, so the adapters (and a KL reference wrapped the same
    way) do not depend on, or disturb, the global RNG stream. A target name that matches no module raises
    a ``ValueError`` naming ``model.lora.target_modules``.
    """
    peft = _peft()
    peft_config = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PEFT_DEPRECATION, category=FutureWarning)
        torch.manual_seed(seed)
        try:
            return peft.get_peft_model(model, peft_config)
        except ValueError as err:
            raise ValueError(f"model.lora.target_modules: {err}") from err


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain transformers model with ``W + (alpha / r) B A`` folded into each targeted weight.

    Works on a deep copy, so the training policy keeps its frozen base and its adapters.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PEFT_DEPRECATION, category=FutureWarning)
        return copy.deepcopy(model).merge_and_unload()


def save_adapter(model: nn.Module, folder: str | Path) -> Path:
    """Save the adapters alone (``adapter_config.json`` + weights); ``PeftModel.from_pretrained`` reloads them."""
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder
