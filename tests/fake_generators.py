"""Test-only rollout engine (``--model.generator=fake_generators.ScriptedGenerator``).

``ScriptedGenerator`` decodes each arithmetic prompt, works out the answer left to right, and answers it
right on even samples (and greedily) and wrong on odd ones, so a group's rewards always differ. It keeps a
copy of the weights it was last synced with, the way an engine such as vLLM does, and records whether every
generation ran on the policy's current weights.
"""

import torch

from corrpo.generation.rollout import Generator, HFGenerator, rollout_from_token_lists
from corrpo.models.loading import build_char_tokenizer


def solve(prompt: str) -> int:
    """``"4 +3 *2 -5 ="`` evaluated left to right, as the embedded task defines it."""
    terms = prompt.replace("=", "").split()
    value = int(terms[0])
    for term in terms[1:]:
        op, number = term[0], int(term[1:])
        value = value + number if op == "+" else value - number if op == "-" else value * number
    return value


class ScriptedGenerator(Generator):
    def __init__(self) -> None:
        self.tokenizer = build_char_tokenizer()  # the tiny policies' tokenizer (engines work on token ids)
        self.synced: dict[str, torch.Tensor] | None = None
        self.syncs = 0
        self.calls = 0
        self.stale_calls = 0  # generations whose engine weights differed from the policy's

    def sync_weights(self, model) -> None:
        self.syncs += 1
        self.synced = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def generate(self, model, prompt_ids, prompt_mask, num_generations, sampling, eos_token_id, pad_token_id,
                 greedy=False):  # fmt: skip
        if self.synced is None:  # first call: the engine is built from the current weights
            self.sync_weights(model)
            self.syncs -= 1
        current = model.state_dict()
        self.calls += 1
        self.stale_calls += any(not torch.equal(current[k], self.synced[k]) for k in current)
        tokenizer = self.tokenizer
        completions = []
        for row, mask in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True):
            answer = solve(tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=True))
            for g in range(num_generations):
                value = answer if greedy or g % 2 == 0 else answer + 1
                text = f"<think>x</think><answer>{value}</answer>"
                completions.append(tokenizer.encode(text, add_special_tokens=False) + [eos_token_id])
        return rollout_from_token_lists(
            prompt_ids, prompt_mask, completions, num_generations, eos_token_id, pad_token_id, sampling.max_new_tokens
        )


class ScriptedSampling(HFGenerator):
    """Greedy generations from the policy's own ``generate`` (HF, sharded or not); sampled ones (RL rollouts)
    scripted as :class:`ScriptedGenerator` answers them, with no random numbers: so RL losses of runs that split
    a batch differently (single process, DDP, FSDP2) can be compared step by step."""

    def __init__(self) -> None:
        self.tokenizer = build_char_tokenizer()

    def generate(self, model, prompt_ids, prompt_mask, num_generations, sampling, eos_token_id, pad_token_id,
                 greedy=False):  # fmt: skip
        if greedy:
            return super().generate(
                model, prompt_ids, prompt_mask, num_generations, sampling, eos_token_id, pad_token_id, greedy=True
            )
        completions = []
        for row, mask in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True):
            answer = solve(self.tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=True))
            for g in range(num_generations):
                text = f"<think>{'x' * (g + 1)}</think><answer>{answer + g % 2}</answer>"
                completions.append(self.tokenizer.encode(text, add_special_tokens=False) + [eos_token_id])
        return rollout_from_token_lists(
            prompt_ids, prompt_mask, completions, num_generations, eos_token_id, pad_token_id, sampling.max_new_tokens
        )
