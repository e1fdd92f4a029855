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


def hang_once(prompts, completions, answer, trainer_state=None, **kwargs):
    """0.5 per sample; but on the RL step ``$CORRPO_HANG_STEP`` (a global step), while the file ``$CORRPO_HANG_MARK``
    does not exist, creates it and hangs, after sending its own process ``$CORRPO_HANG_SIGNALS`` SIGTERMs (a
    scheduler's pre-emption, then its second signal): the step cannot end by itself. Resumed, it no longer hangs."""
    import os
    import signal
    import time
    from pathlib import Path

    mark = Path(os.environ.get("CORRPO_HANG_MARK", "/nonexistent/mark"))
    step = int(os.environ.get("CORRPO_HANG_STEP", "-1"))
    if trainer_state is not None and trainer_state.global_step == step and mark.parent.is_dir() and not mark.exists():
        mark.touch()
        for _ in range(int(os.environ.get("CORRPO_HANG_SIGNALS", "1"))):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        time.sleep(600)
    return [0.5] * len(completions)


def exits(completions, **kwargs):
    """Calls ``sys.exit(0)``, as a script's reward module might."""
    import sys

    sys.exit(0)


def per_sample_dicts(completions, **kwargs):
    """One dict per sample (a shape TRL never accepts)."""
    return [{"score": 1.0} for _ in completions]
