"""Build the tutorial's reward model: a tiny random Qwen2 sequence classifier (``num_labels=1``) and corrpo's tiny
tokenizer (with its chat template), saved with ``save_pretrained`` to a local folder, offline.

A real reward model is trained (TRL's ``RewardTrainer``) or downloaded; this one is random, so its scores are noise:
it shows how an ``rl.rewards`` entry ``{model: <folder>}`` is loaded, batched and run on the policy's device.

Usage (from the repository root)::

    .venv/bin/python docs/tutorials/chat-model/make_reward_model.py [folder]   # default runs/chat-model/reward-model
"""

import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForSequenceClassification

from corrpo.models.loading import TinyArchitecture, build_tiny_tokenizer

DEFAULT_FOLDER = "runs/chat-model/reward-model"


def build_reward_model(folder: str | Path = DEFAULT_FOLDER, seed: int = 0) -> Path:
    """Save a tiny sequence classifier and its tokenizer to ``folder``; returns the folder."""
    folder = Path(folder)
    tokenizer = build_tiny_tokenizer(TinyArchitecture())
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    Qwen2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    print(f"reward model saved to {build_reward_model(*sys.argv[1:2])}")
