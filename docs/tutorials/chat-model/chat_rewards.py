"""The tutorial's own rewards (docs/tutorials/chat-model.md): a verl-style ``compute_score`` and a reward factory.

Both are named in ``chat.yaml`` by import path, so this folder must be on ``PYTHONPATH``.
"""

import re

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's signature (``verl/utils/reward_score``): one sample at a time, the completion as text.

    1.0 when the last ``\\boxed{}`` of the completion holds the gold answer, else 0.0; returned as verl's dict form,
    whose other keys (``boxed``) corrpo adds to the completions table as ``verl/boxed``.
    """
    boxed = BOXED.findall(solution_str)
    answer = boxed[-1].strip() if boxed else None
    return {"score": float(answer == str(ground_truth)), "boxed": answer is not None}


def get_max_words_reward(max_words, penalty=-1.0):
    """A reward factory, as TRL's ``get_soft_overlong_punishment``: ``rl.rewards`` calls it with its ``kwargs`` and
    scores with the function it returns (``penalty`` for a completion of more than ``max_words`` words, else 0.0)."""

    def max_words_reward(completions, **kwargs):
        # conversational data hands each completion over as [{"role": "assistant", "content": ...}], text data as str
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [penalty if len(text.split()) > max_words else 0.0 for text in texts]

    return max_words_reward
