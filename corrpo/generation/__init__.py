"""Rollouts: sampled completions of prompts as token tensors (:class:`~corrpo.generation.rollout.Rollout`).

The Generator interface with Hugging Face's ``generate`` behind it (``rollout``); the lean decode loop that emits
``generate``'s tokens faster on the families whose layout it can read: its adapter and capability policy
(``decode_loop``), its per-family step read through the family layout (``decode_step``) and its sampling
(``sampling``); and colocated vLLM (``vllm``).

Imports: :mod:`corrpo.models` only. Training, evaluation and the run's entry points import this room.
"""
