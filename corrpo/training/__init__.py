"""The training steps as plain code, outside Lightning: the module, benchmarks and tests call the same functions.

- :mod:`corrpo.training.grpo`: one RL step (rollout -> rewards -> CorR-PO term -> advantages -> updates).
- :mod:`corrpo.training.sft`: one SFT step (completion-token NLL).
- :mod:`corrpo.training.update`: backward, non-finite guard, clip, lr, optimizer step.
- :mod:`corrpo.training.collectives`: the few cross-rank reductions the steps need (identity on one process).
- :mod:`corrpo.training.forward`: logits and completion log-probs of a batch.
- :mod:`corrpo.training.phases`: the SFT -> RL phase schedule, with the boundary written once.
"""
