"""Training as plain code, outside Lightning: the module, the benchmarks and the tests call the same functions.

The phase configs (``config``), one RL step (``grpo``: rollout -> rewards -> CorR-PO term -> advantages ->
updates), the CorR-PO term in one home (``corrpo_term``: its config, the bonus, both scoring paths, its result),
one SFT step (``sft``), the update (``update``: backward, non-finite guard, clip, lr, optimizer step), the
objective math (``objectives``, ``covariance_tokens``), the completion log-probs of a rollout (``forward``), the
lr schedule (``schedule``), evaluation (``evaluation``), cross-rank reductions (``collectives``), the phase
schedule (``phases``), the interfaces the callbacks and the data module are read through, with the one
even-split check (``host``), and the RNG snapshot for exact resume (``rng``).

Imports: :mod:`corrpo.models`, :mod:`corrpo.generation`, :mod:`corrpo.inversion`, :mod:`corrpo.rewards`. Never
the module, the CLI, the data module, the runs room or the callbacks.
"""
