"""Every listed decoder family x every exact strength method: wall time and max relative error against ``loop``.

Each family's tiny random model (``corrpo.models.tiny_families.random_family_model``: 2 layers, ``--hidden`` wide,
init std 0.2, perturbed norms, the family's soft-caps / windows / multipliers shrunk so that they bite) scores
``--batch`` left-padded random sequences of length ``--seq`` with the last layer's q, k, v, o and MLP
weights (nuclear norm). ``loop`` is the reference; a family counts EXACT when every method available for it
matches the loop to ``1e-4`` relative per token (``max_relative_error``).

Then bf16: the same models with bf16 weights. The reference is an fp64 ``loop`` on those very (bf16-rounded)
weights; ``onepass`` runs on the bf16 model as loaded (``bf16``), and again on an fp32 upcast of it
(``fp32_upcast``); ``bf16_loop`` is the loop on the bf16 model, to tell bf16 arithmetic from the closed
forms. Reported per family:
the max and median per-token relative error of S_t, and |Spearman(H, S) - Spearman_ref| over the tokens.

    python benchmarks/families.py                        # ~1 min on one CPU thread
    python benchmarks/families.py --families qwen3 gpt2 --seq 64

Last line: ``RESULT families_exact=<n> families_total=<m> bf16_max_rel_err=<e> bf16_max_spearman_gap=<g>``.
"""

from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from compute_floor import best_of  # noqa: E402

from corrpo.inversion.correlation import batched_spearman  # noqa: E402
from corrpo.inversion.strength import StrengthConfig, score_tokens  # noqa: E402
from corrpo.inversion.strength_common import max_relative_error  # noqa: E402
from corrpo.models.loading import TinyArchitecture  # noqa: E402
from corrpo.models.tiny_families import TINY_FAMILY_NAMES, random_family_model  # noqa: E402

METHODS = ("loop", "vmap", "onepass")
TOL = 1e-4
VOCAB = 128


def probe(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    attn = torch.ones_like(ids)
    for b in range(batch):  # left padding of 0, 3, 6, ... tokens
        attn[b, : (3 * b) % (seq // 2)] = 0
    return ids, attn, attn.bool()


def exactness(family: str, arch: TinyArchitecture, args) -> dict[str, tuple[float, float]]:
    """method -> (seconds, max relative error vs loop) on the fp32 model."""
    model = random_family_model(family, VOCAB, arch)
    ids, attn, mask = probe(args.batch, args.seq)
    out, ref = {}, None
    for method in METHODS:
        cfg = StrengthConfig(projections=("q", "k", "v", "o", "mlp"), method=method)
        secs, (_, strength) = best_of(
            lambda c=cfg: score_tokens(model, ids, attn, mask, c), 1 if method == "loop" else args.repeats
        )
        ref = strength if method == "loop" else ref
        out[method] = (secs, max_relative_error(strength, ref))
    return out


def bf16_errors(family: str, arch: TinyArchitecture, args) -> dict[str, tuple[float, float, float]]:
    """variant -> (max rel err, median rel err, |spearman gap|) of onepass against an fp64 loop, bf16 weights."""
    bf16 = random_family_model(family, VOCAB, arch).to(torch.bfloat16)
    ids, attn, mask = probe(args.bf16_batch, args.seq)
    # no padding here: transformers' eager masks in fp64 become -inf in the fp32 softmax, so fully masked pad
    # query rows turn NaN and contaminate the fp64 reference's backward (0 * NaN); fp32/bf16 are unaffected
    attn, mask = torch.ones_like(attn), torch.ones_like(mask)
    proj = ("q", "k", "v", "o", "mlp")
    reference = copy.deepcopy(bf16).double()
    if getattr(reference.config, "_experts_implementation", None) not in (None, "eager"):
        reference.config._experts_implementation = "eager"  # torch's grouped_mm (the MoE default) has no fp64
    h_ref, s_ref = score_tokens(reference, ids, attn, mask, StrengthConfig(projections=proj, method="loop"))
    scored = torch.isfinite(s_ref)
    rho_ref = batched_spearman(h_ref[scored], s_ref[scored]).item()
    out = {}
    variants = (
        ("bf16", bf16, "onepass"),
        ("bf16_loop", bf16, "loop"),
        ("fp32_upcast", copy.deepcopy(bf16).float(), "onepass"),
    )
    for name, model, method in variants:
        h, s = score_tokens(model, ids, attn, mask, StrengthConfig(projections=proj, method=method))
        ref = s_ref[scored].double()
        nonzero = ref.abs() > 1e-2 * ref.abs().max()  # as max_relative_error's floor: skip exact-zero q/k rows
        rel = ((s[scored].double() - ref) / ref).abs()[nonzero]
        rho = batched_spearman(h[scored], s[scored]).item()
        out[name] = (max_relative_error(s, s_ref), rel.median().item(), abs(rho - rho_ref))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(TINY_FAMILY_NAMES), choices=TINY_FAMILY_NAMES)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2, help="sequences per call in the timing table")
    parser.add_argument("--bf16-batch", type=int, default=8, help="sequences in the bf16 comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arch = TinyArchitecture(hidden_size=args.hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=2 * args.hidden, max_position_embeddings=max(256, args.seq))  # fmt: skip
    print(f"tiny random models: 2 layers, hidden {args.hidden}, vocab {VOCAB}; {args.batch} x {args.seq} tokens, "
          f"last layer q k v o mlp, nuclear; CPU, {torch.get_num_threads()} thread(s); "
          f"exact = max rel err <= {TOL:.0e}")  # fmt: skip
    header = f"{'family':11} " + " ".join(f"{m + '_s':>10} {m + '_err':>11}" for m in METHODS) + f" {'exact':>6}"
    print(header)
    print("-" * len(header))
    exact = 0
    for family in args.families:
        row = exactness(family, arch, args)
        ok = all(err <= TOL for _, err in row.values())
        exact += ok
        cells = " ".join(f"{row[m][0]:>10.4f} {row[m][1]:>11.2e}" for m in METHODS)
        print(f"{family:11} {cells} {'yes' if ok else 'NO':>6}")
    print(f"\nbf16 weights: onepass vs an fp64 loop on the same weights, {args.bf16_batch} x {args.seq} tokens")
    header = f"{'family':11} {'variant':12} {'max_rel_err':>12} {'med_rel_err':>12} {'spearman_gap':>13}"
    print(header)
    print("-" * len(header))
    worst_err = worst_gap = 0.0
    for family in args.families:
        for variant, (err, med, gap) in bf16_errors(family, arch, args).items():
            if variant == "bf16":
                worst_err, worst_gap = max(worst_err, err), max(worst_gap, gap)
            print(f"{family:11} {variant:12} {err:>12.2e} {med:>12.2e} {gap:>13.2e}")
    print(f"RESULT families_exact={exact} families_total={len(args.families)} "
          f"bf16_max_rel_err={worst_err:.2e} bf16_max_spearman_gap={worst_gap:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
