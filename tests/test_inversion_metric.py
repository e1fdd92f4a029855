"""InversionStrength: equals scipy on all pairs seen, caps and counts, ignores non-finite, syncs under DDP."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import stats

from corrpo.inversion.metric import InversionStrength


def _batches(seed: int = 0, n_batches: int = 4, b: int = 3, t: int = 20):
    """Padded ``[B, T]`` batches with ragged masks; strength anti-correlated with entropy, with ties."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ent = torch.rand(b, t, generator=g) * 4
        strength = (8 - ent + torch.randn(b, t, generator=g)).round()  # integer-valued: many ties
        lengths = torch.randint(0, t + 1, (b,), generator=g)
        mask = torch.arange(t)[None] < lengths[:, None]
        out.append((ent, strength, mask))
    return out


def _reference(batches):
    ent = torch.cat([e[m] for e, _, m in batches]).double().numpy()
    strength = torch.cat([s[m] for _, s, m in batches]).double().numpy()
    return stats.spearmanr(ent, strength)[0], stats.pearsonr(ent, strength)[0], len(ent)


def _check(result, batches):
    rho, r, n = _reference(batches)
    assert set(result) >= {"spearman", "pearson", "strength", "n_tokens"}
    assert all(v.ndim == 0 for v in result.values())
    assert math.isclose(result["spearman"].item(), rho, abs_tol=1e-12)
    assert math.isclose(result["pearson"].item(), r, abs_tol=1e-12)
    assert result["strength"].item() == -result["spearman"].item()
    assert result["n_tokens"].item() == n


def test_matches_scipy_over_several_updates():
    batches = _batches()
    metric = InversionStrength(max_tokens=1000)
    for ent, strength, mask in batches:
        metric.update(ent, strength, mask)
    result = metric.compute()
    _check(result, batches)
    assert result["spearman"].item() < -0.3  # the synthetic data is inverted
    assert result["n_dropped"].item() == 0 and result["n_nonfinite"].item() == 0


def test_forward_returns_batch_value_and_accumulates():
    batches = _batches(seed=1)
    metric = InversionStrength(max_tokens=1000)
    for batch in batches:
        _check(metric(*batch), [batch])
    _check(metric.compute(), batches)
    assert metric.entropy_buf.shape == (1000,) and metric.count.shape == (1,)


def test_merge_state_unions_pairs():
    batches = _batches(seed=2)
    a, b = InversionStrength(max_tokens=500), InversionStrength(max_tokens=500)
    for batch in batches[:2]:
        a.update(*batch)
    for batch in batches[2:]:
        b.update(*batch)
    a.merge_state(b)
    _check(a.compute(), batches)


def test_flat_inputs_and_default_mask():
    g = torch.Generator().manual_seed(3)
    ent, strength = torch.randn(64, generator=g), torch.randn(64, generator=g)
    metric = InversionStrength(max_tokens=100)
    metric.update(ent, strength)
    _check(metric.compute(), [(ent, strength, torch.ones(64, dtype=torch.bool))])


def test_cap_drops_and_counts():
    batches = _batches(seed=4)
    n_total = sum(int(m.sum()) for _, _, m in batches)
    cap = n_total // 2
    metric = InversionStrength(max_tokens=cap)
    for batch in batches:
        metric.update(*batch)
    result = metric.compute()
    assert result["n_tokens"].item() == cap
    assert result["n_dropped"].item() == n_total - cap
    # The kept pairs are the first `cap` valid pairs in arrival order.
    ent = torch.cat([e[m] for e, _, m in batches]).double()[:cap]
    strength = torch.cat([s[m] for _, s, m in batches]).double()[:cap]
    assert torch.equal(metric.entropy_buf, ent) and torch.equal(metric.strength_buf, strength)
    assert math.isclose(result["spearman"].item(), stats.spearmanr(ent, strength)[0], abs_tol=1e-12)


def test_non_finite_pairs_are_ignored_and_counted():
    ent, strength, mask = _batches(seed=5, n_batches=1, b=2, t=30)[0]
    mask[:] = True
    clean_mask = mask.clone()
    nan, inf = float("nan"), float("inf")
    ent[0, 3], strength[0, 7], ent[1, 0], strength[1, 1] = nan, inf, -inf, nan
    clean_mask[0, 3] = clean_mask[0, 7] = clean_mask[1, 0] = clean_mask[1, 1] = False
    ent[1, 29] = float("nan")  # masked out: neither used nor counted
    mask[1, 29] = clean_mask[1, 29] = False
    metric = InversionStrength(max_tokens=100)
    metric.update(ent, strength, mask)
    result = metric.compute()
    assert result["n_nonfinite"].item() == 4
    _check(result, [(ent, strength, clean_mask)])


def test_reset_and_empty_compute():
    metric = InversionStrength(max_tokens=500)
    with pytest.warns(UserWarning):  # torchmetrics: compute() called before update()
        empty = metric.compute()
    assert empty["spearman"].isnan() and empty["pearson"].isnan() and empty["n_tokens"].item() == 0
    batches = _batches(seed=6, n_batches=1)
    metric.update(*batches[0])
    metric.reset()
    assert metric.count.item() == 0 and (metric.entropy_buf == 0).all()
    batches = _batches(seed=7, n_batches=2)
    for batch in batches:
        metric.update(*batch)
    _check(metric.compute(), batches)


def test_shape_mismatch_raises():
    metric = InversionStrength(max_tokens=10)
    with pytest.raises(ValueError):
        metric.update(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError):
        metric.update(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(6, dtype=torch.bool))


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Each rank updates with its own share of the data; every rank saves its synced compute()."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        batches = _batches(seed=8, n_batches=6)
        # Uneven shares (rank 0: 2 batches, rank 1: 4) so the per-rank counts differ.
        mine = batches[:2] if rank == 0 else batches[2:]
        metric = InversionStrength(max_tokens=400)
        for batch in mine:
            metric.update(*batch)
        first = metric.compute()
        local_count = metric.count.clone()  # unsynced again after compute
        extra = _batches(seed=9, n_batches=2)
        metric.update(*extra[rank])
        second = metric.compute()
        torch.save({"first": first, "second": second, "local_count": local_count}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_sync_equals_single_process(tmp_path, monkeypatch):
    world = 2
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no reliance on hostname resolution
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    batches = _batches(seed=8, n_batches=6)
    extra = _batches(seed=9, n_batches=2)
    for res in results:
        _check(res["first"], batches)
        _check(res["second"], batches + extra)
    assert results[0]["local_count"].item() == sum(int(m.sum()) for _, _, m in batches[:2])
