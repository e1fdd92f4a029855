r"""The CorR-PO term, in one home: its config, the bonus, both ways of scoring it, and its result.

The paper does not publish its formula; ours is explicit and configurable (``rl.inversion.*``,
:class:`CorrPOTermConfig`):

.. math::
    r_i' = r_{\text{task},i} + \lambda \cdot \operatorname{clip}(-\rho_i, -1, 1)

where :math:`\rho_i` is the Spearman (or Pearson) correlation between token entropy :math:`H_t` (bits) and the
gradient strength :math:`S_t` of the chosen token's raw logit, over response :math:`i`'s OWN completion tokens
only. :math:`r_i'` then enters the usual group-normalised GRPO advantage; :math:`\lambda = 0` is plain GRPO
(nothing is computed).

Why per response: the advantage ranks the ``G`` responses to one prompt against each other, so the bonus must
differ between them; a batch-level correlation would add the same constant to every member of a group and
cancel in the group mean. Pooling over the prompt tokens would mix in text the policy did not choose.

Why the clip: :math:`\rho \in [-1, 1]` already; the clip only guards a rounding excursion and documents the
scale (the bonus is at most :math:`|\lambda|`, comparable to a 0/1 accuracy reward when :math:`\lambda \le 1`).

Responses with too few scored tokens (``min_tokens``) or an undefined correlation (constant entropy, < 2 tokens)
get bonus 0 and ``valid = False``: never NaN, which ``group_advantages`` would reject.

Two scoring paths give the same :class:`CorrPOTerm`: :func:`corrpo_term` scores the rollout in a pass of its own
(:func:`corrpo.inversion.strength.score_tokens`, any strength method); :func:`corrpo_term_on_update_forward` scores
it on the update's own forward where that is exact (:func:`shares_update_forward`), at no forward of its own. The
measurement itself (entropy, strengths, correlations) lives in :mod:`corrpo.inversion`: nothing is re-implemented.

Files: ``config`` (:class:`CorrPOTermConfig`, the ``rl.inversion.*`` keys), ``correlations`` (each response's
``rho_i``), ``bonus`` (:class:`CorrPOTerm`, the bonus, and where the term enters: the reward or the advantage),
``scoring`` (both scoring paths). Import the names from here.
"""

from corrpo.training.corrpo_term.bonus import (
    CorrPOTerm,
    corrpo_bonus,
    enter_term,
    standardised_bonus,
    with_reward_term,
)
from corrpo.training.corrpo_term.config import APPLY_MODES, CORRELATIONS, CorrPOTermConfig
from corrpo.training.corrpo_term.correlations import response_correlations, rollout_correlations
from corrpo.training.corrpo_term.scoring import (
    corrpo_term,
    corrpo_term_on_update_forward,
    has_active_dropout,
    shares_update_forward,
)

__all__ = [
    "APPLY_MODES",
    "CORRELATIONS",
    "CorrPOTerm",
    "CorrPOTermConfig",
    "corrpo_bonus",
    "corrpo_term",
    "corrpo_term_on_update_forward",
    "enter_term",
    "has_active_dropout",
    "response_correlations",
    "rollout_correlations",
    "shares_update_forward",
    "standardised_bonus",
    "with_reward_term",
]
