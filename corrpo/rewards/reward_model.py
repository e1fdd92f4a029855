"""A reward model as TRL's GRPOTrainer uses one: a sequence classifier scoring prompt + completion.

TRL 1.16 (``grpo_trainer.py``: ``__init__`` and ``_calculate_rewards``) loads a reward model given by name with
``AutoModelForSequenceClassification.from_pretrained(name, num_labels=1)`` and its tokenizer from the same place
(pad token = eos when it has none, written into the model's config, since the classifier reads the last non-pad
token), then per batch: conversational prompts as ``prompt + [assistant message]`` through the reward tokenizer's
chat template, else ``prompt + completion`` text; tokenised right-padded without added special tokens; the reward
is ``logits[:, 0]`` under inference mode. :class:`RewardModel` does that, in chunks of ``batch_size`` texts, on
whatever device it was moved to (:func:`place_rewards`: the module puts it on the policy's device at fit start).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from corrpo.rewards.call import completion_text, is_conversational

REWARD_MODEL_DTYPES = ("float32", "bfloat16", "float16")


class RewardModel:
    """A local sequence classifier (``num_labels=1``) and its tokenizer, called as a reward: one score per sample.

    Args:
        folder: a local folder with the model and its tokenizer files (``save_pretrained`` of both).
        batch_size: texts per forward.
        dtype: ``float32`` / ``bfloat16`` / ``float16``; None = ``from_pretrained``'s default.
    """

    def __init__(self, folder: str, batch_size: int = 16, dtype: str | None = None) -> None:
        if not Path(folder).is_dir():
            raise ValueError(f"{folder!r} is not a folder (a reward model is a local save_pretrained folder)")
        self.folder, self.batch_size = folder, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        load_kwargs = {} if dtype is None else {"dtype": getattr(torch, dtype)}
        self.model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, **load_kwargs)
        # the classifier scores the last non-pad token: it must know the tokenizer's pad id (TRL does the same)
        self.model.config.get_text_config().pad_token_id = self.tokenizer.pad_token_id
        self.model.requires_grad_(False).eval()
        self.__name__ = Path(folder).name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> RewardModel:
        """Move the model (the module calls this with the policy's device at fit start)."""
        self.model.to(device)
        return self

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
        """What the classifier reads per sample: the chat template over prompt + assistant message for conversational
        prompts (the prompt's own trailing assistant prefill dropped: the completion starts with it), else the prompt
        text followed by the completion text."""
        template = getattr(self.tokenizer, "chat_template", None)
        out = []
        for prompt, completion in zip(prompts, completions, strict=True):
            text = completion_text(completion)
            if not is_conversational(prompt):
                out.append(str(prompt) + text)
                continue
            messages = list(prompt[:-1] if prompt[-1]["role"] == "assistant" else prompt)
            messages.append({"role": "assistant", "content": text})
            if template:
                out.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
            else:
                out.append("\n".join(str(m["content"]) for m in messages))
        return out

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        texts = self.texts(prompts, completions)
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    text=texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    padding_side="right",
                    add_special_tokens=False,
                )
                batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
                scores.extend(self.model(**batch).logits[:, 0].float().tolist())
        return scores

    def __repr__(self) -> str:
        return f"RewardModel({self.folder!r}, batch_size={self.batch_size})"


def place_rewards(reward_fns: Iterable[Any], device: torch.device | str) -> None:
    """Move every reward that has a ``to`` (a :class:`RewardModel`, or a user's model-backed reward) to ``device``."""
    for fn in reward_fns:
        move = getattr(fn, "to", None)
        if callable(move):
            move(device)
