"""The benchmarks' compute floor (``benchmarks/compute_floor.py``) counts the FLOPs a real forward performs."""

from types import SimpleNamespace

import pytest
import torch
from compute_floor import (  # benchmarks/, on sys.path through conftest
    alternating_best,
    attention_flops,
    best_of,
    decode_flops,
    eigen_seconds_of,
    floor_fraction,
    forward_flops,
    timed_calls,
    timed_eigen_solves,
)
from conftest import TINY_ARCH
from torch.utils.flop_counter import FlopCounterMode

from corrpo.module import CorrPOModule


def test_forward_flops_equal_torchs_count_of_a_real_forward():
    policy = CorrPOModule(policy="tiny-qwen2", tiny=TINY_ARCH, seed=0).policy.eval()
    policy.set_attn_implementation("eager")  # attention as matmuls torch can count (its CPU SDPA kernel is not)
    config, rows, seq = policy.config, 3, 20
    ids = torch.randint(0, config.vocab_size, (rows, seq))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        policy(input_ids=ids, use_cache=False)
    counted = counter.get_total_flops()
    # eager attention multiplies the full (masked) score matrix; the floor counts the causal pairs only
    full = attention_flops(config, seq, causal=False) - attention_flops(config, seq)
    assert counted == forward_flops(config, rows, seq) + rows * config.num_hidden_layers * full


def test_floor_fraction_is_the_share_of_time_the_flops_need():
    assert abs(floor_fraction(2e9, 100.0, 0.1) - 0.2) < 1e-12  # 2 GFLOP at 100 GFLOP/s take 0.02 s of the 0.1 s


def test_decode_flops_per_row_lengths_add_each_rows_own_decode_to_one_prefill():
    config = CorrPOModule(policy="tiny-qwen2", tiny=TINY_ARCH, seed=0).policy.config
    P, lengths = 7, [5, 12, 1]
    assert decode_flops(config, 3, P, [9, 9, 9], prefill_rows=2) == decode_flops(config, 3, P, 9, prefill_rows=2)
    one_prefill = forward_flops(config, 1, P, unembedded=1)
    per_row = sum(decode_flops(config, 1, P, n) - one_prefill for n in lengths)
    assert decode_flops(config, 3, P, lengths, prefill_rows=1) == one_prefill + per_row
    assert decode_flops(config, 3, P, lengths) < decode_flops(config, 3, P, max(lengths))


def test_timed_eigen_solves_sums_every_call_and_restores_the_solvers():
    originals = torch.linalg.eigvalsh, torch.linalg.eigh
    m = torch.eye(6, dtype=torch.float64).expand(50, 6, 6)
    with timed_eigen_solves() as spent:
        torch.linalg.eigvalsh(m)
        torch.linalg.eigh(m)
        assert torch.equal(torch.linalg.eigvalsh(m[0]), torch.ones(6, dtype=torch.float64))  # the real solver
    assert spent["calls"] == 3 and spent["seconds"] > 0.0
    assert (torch.linalg.eigvalsh, torch.linalg.eigh) == originals
    with timed_eigen_solves() as none:
        pass
    assert none == {"seconds": 0.0, "calls": 0}


def test_eigen_seconds_of_is_the_least_of_the_repeats():
    calls = []

    def solve():
        calls.append(1)
        torch.linalg.eigvalsh(torch.eye(4, dtype=torch.float64).expand(8, 4, 4))

    assert eigen_seconds_of(solve, 3) > 0.0 and len(calls) == 3
    assert eigen_seconds_of(lambda: None, 2) == 0.0


def test_timed_calls_counts_each_class_and_restores_functions_and_tensor_methods():
    original_bmm = torch.bmm
    a = torch.randn(3, 2, 4)
    with timed_calls({"products": [(torch, "bmm")], "draws": [(torch.Tensor, "exponential_")]}) as spent:
        for _ in range(3):
            out = torch.bmm(a, a.mT)
        torch.empty(5).exponential_(1)
        torch.empty(5).exponential_(1)
    assert torch.equal(out, original_bmm(a, a.mT))  # the real function ran
    assert spent["products"]["calls"] == 3 and spent["draws"]["calls"] == 2
    assert spent["products"]["seconds"] > 0.0 and spent["draws"]["seconds"] > 0.0
    assert torch.bmm is original_bmm and "exponential_" not in vars(torch.Tensor)  # inherited: the wrapper is gone


def test_timed_calls_counts_a_call_made_inside_another_timed_call_once():
    holder = SimpleNamespace(outer=lambda: torch.bmm(torch.ones(1, 1, 1), torch.ones(1, 1, 1)))
    with timed_calls({"outer": [(holder, "outer")], "bmm": [(torch, "bmm")]}) as spent:
        holder.outer()
        torch.bmm(torch.ones(1, 1, 1), torch.ones(1, 1, 1))
    assert spent["outer"]["calls"] == 1 and spent["bmm"]["calls"] == 1


def test_timed_calls_restores_the_functions_when_the_body_raises():
    original = torch.baddbmm
    with pytest.raises(RuntimeError, match="inside"):
        with timed_calls({"products": [(torch, "baddbmm")]}):
            raise RuntimeError("inside")
    assert torch.baddbmm is original


def test_best_of_warms_up_once_then_keeps_the_least_time_and_the_last_result():
    calls, synced = [], []
    seconds, out = best_of(lambda: calls.append(len(calls)) or len(calls), 3, sync=lambda: synced.append(1))
    assert len(calls) == 4 and out == 4  # one untimed warm-up, then 3 timed calls: the last one's result
    assert len(synced) == 6 and 0.0 <= seconds < float("inf")  # a sync before each of the 2 clock reads a call


def test_alternating_best_runs_the_sides_in_turn_each_round():
    order = []
    best = alternating_best({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 2)
    assert order == ["a", "b", "a", "b", "a", "b"]  # a warm-up each, then 2 rounds of a, b
    assert set(best) == {"a", "b"} and all(0.0 <= s < float("inf") for s in best.values())
