"""Snapshot and restore every random number generator a training step draws from.

Sampling rollouts draws from torch's global generator (and CUDA's on a GPU); Python's and NumPy's are
saved too because reward functions and user code may use them. Lightning does not store these in a
checkpoint, so without them a resumed RL run samples different completions than an uninterrupted one.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_states() -> dict:
    """The current states of Python's, NumPy's, torch's CPU and (when present) CUDA generators."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # plain Python types only, so that the checkpoint loads with ``torch.load(weights_only=True)``
    numpy_state = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Put back states taken by :func:`rng_states` (a missing entry leaves that generator alone)."""
    if "python" in states:
        random.setstate(states["python"])
    if "numpy" in states:
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
