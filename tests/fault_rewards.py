"""Test-only reward function with a fault, resolved by import path (``fault_rewards:flaky``)."""


def poisoned(completion: str) -> bool:
    """The samples ``flaky`` cannot score: a pure function of the completion, so tests can recount them."""
    return len(completion) % 3 == 0


def flaky(prompts, completions, answer, **kwargs):
    """1.0 per sample, but raises when any sample in the call is ``poisoned`` (as a buggy verifier would).

    Called on the whole batch it raises; retried per sample it raises on exactly the poisoned samples, which
    the trainer must score 0, count in ``rewards/flaky/failed`` and then go on.
    """
    if any(poisoned(c) for c in completions):
        raise RuntimeError("flaky reward: cannot score this sample")
    return [1.0] * len(completions)
