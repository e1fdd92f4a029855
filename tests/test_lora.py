"""LoRA (model.lora): only adapters train, the inversion is measured on W_eff = W + (alpha/r) B A, export merges."""

import csv
import math
import sys

import pytest
import torch

pytest.importorskip("peft")

from conftest import run_tiny  # noqa: E402
from strength_checks import assert_close  # noqa: E402

from corrpo.inversion.strength import StrengthConfig, logit_grad_strength, score_tokens  # noqa: E402
from corrpo.inversion.strength_common import max_relative_error  # noqa: E402
from corrpo.models.loading import TinyArchitecture, export_policy, load_policy  # noqa: E402
from corrpo.models.lora import LoRAConfig, apply_lora, merged_copy  # noqa: E402

ARCH = TinyArchitecture(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _lora_policy(family: str = "tiny-qwen2", targets: list[str] | None = None, seed: int = 3):
    """A tiny LoRA policy with NON-zero B (a freshly wrapped model equals its base: nothing to tell apart)."""
    base, tok = load_policy(family, ARCH, seed=seed)
    model = apply_lora(base, LoRAConfig(r=4, alpha=8, target_modules=targets or ALL_TARGETS), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval(), tok


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(8, 90, (2, 12), generator=gen)
    attn = torch.ones_like(ids)
    attn[0, :4] = 0  # left padding
    token_mask = attn.bool().clone()
    token_mask[1, 5] = False
    return ids, attn, token_mask


def test_only_adapters_require_grad_and_the_wrapped_policy_starts_as_its_base():
    base, tok = load_policy("tiny-qwen2", ARCH, seed=3)
    ids = torch.tensor([tok("3 +4 =", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        before = base.eval()(ids).logits
    model = apply_lora(base, LoRAConfig(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 4 * ARCH.num_hidden_layers  # A and B of q, k, v, o in every layer
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, before)  # B = 0 at init


@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-llama"])
def test_strength_is_on_the_effective_weights_for_every_method(family):
    model, _ = _lora_policy(family)
    merged = merged_copy(model)
    base, _ = load_policy(family, ARCH, seed=3)
    ids, attn, token_mask = _batch()
    for proj in (("q",), ("k",), ("v",), ("o",), ("mlp",), ("q", "k", "v", "o")):
        ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(projections=proj, method="loop"))
        assert torch.isfinite(ref).sum() > 10
        # the LoRA model and the merged model have the same effective weights, hence the same strengths
        on_merged = logit_grad_strength(merged, ids, attn, token_mask, StrengthConfig(projections=proj, method="loop"))
        assert_close(on_merged, ref)
        for method in ("onepass", "vmap"):
            cfg = StrengthConfig(projections=proj, method=method, chunk_size=5)
            assert_close(logit_grad_strength(model, ids, attn, token_mask, cfg), ref)
        # ... and not those of the base model alone: the adapters are part of what is measured
        on_base = logit_grad_strength(base, ids, attn, token_mask, StrengthConfig(projections=proj, method="loop"))
        assert max_relative_error(on_base, ref) > 1e-2
    for layers in ("all", [0]):
        cfg = dict(layers=layers, projections=("q", "v", "mlp"))
        ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**cfg, method="loop"))
        assert_close(logit_grad_strength(merged, ids, attn, token_mask, StrengthConfig(**cfg, method="loop")), ref)
        assert_close(logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**cfg, method="vmap")), ref)


@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-llama"])
def test_sketch_is_on_the_effective_weights_too(family):
    from corrpo.inversion.strength_common import ScoringBatch
    from corrpo.inversion.strength_sketch import sketch_squared_norms
    from corrpo.models.architectures import select_weights

    model, _ = _lora_policy(family)
    ids, attn, token_mask = _batch()
    batch = ScoringBatch.build(ids, attn, token_mask)
    for layer, projection in ((0, "v"), (1, "q")):
        config = StrengthConfig("frobenius", [layer], (projection,), "loop")
        ref = logit_grad_strength(model, ids, attn, token_mask, config)
        ((_, weight),) = select_weights(model, [layer], (projection,))  # the frozen base W under the adapter
        basis = torch.eye(weight.numel()).view(weight.numel(), *weight.shape)
        assert_close(batch.scatter(sketch_squared_norms(model, batch, weight, basis, chunk_size=256).sqrt()), ref)
    cfg = StrengthConfig("frobenius", "all", ("q", "v"), "sketch", sketch_dim=2)
    logit_grad_strength(model, ids, attn, token_mask, cfg)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_loop_on_lora_is_the_brute_force_gradient_of_the_merged_weight():
    model, _ = _lora_policy()
    merged = merged_copy(model).requires_grad_(True)
    ids, attn, _ = _batch()
    b, j = 0, 9
    one = torch.zeros_like(attn, dtype=torch.bool)
    one[b, j] = True
    got = logit_grad_strength(model, ids, attn, one, StrengthConfig(projections=("v",), method="loop"))[b, j]
    logits = merged(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    logits[b, j - 1, ids[b, j]].backward()
    w_eff = merged.model.layers[-1].self_attn.v_proj.weight
    assert got.item() == pytest.approx(torch.linalg.matrix_norm(w_eff.grad, ord="nuc").item(), rel=1e-5)


def test_scoring_restores_the_frozen_base_and_leaves_no_grad():
    model, _ = _lora_policy(targets=["q_proj", "v_proj"])
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids, attn, token_mask = _batch()
    for method in ("loop", "onepass", "vmap"):
        entropy, strength = score_tokens(model, ids, attn, token_mask, StrengthConfig(method=method))
        assert torch.equal(entropy.isfinite(), strength.isfinite()) and strength.isfinite().any()
        assert model.training
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_export_merges_the_adapters_and_keeps_them_apart(tmp_path):
    from peft import PeftModel

    model, tok = _lora_policy()
    ids = torch.tensor([tok("7 +3 *2 =", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = model(ids).logits
    folder = export_policy(model, tok, tmp_path / "policy")
    assert any(".lora_" in n for n, _ in model.named_parameters())  # the training policy keeps its adapters
    loaded, _ = load_policy(str(folder))
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    base, _ = load_policy("tiny-qwen2", ARCH, seed=3)
    reapplied = PeftModel.from_pretrained(base, folder / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reapplied(ids).logits, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_dora_is_rejected_by_the_strength_code():
    import peft

    base, _ = load_policy("tiny-qwen2", ARCH)
    dora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["v_proj"], use_dora=True))
    ids, attn, token_mask = _batch()
    with pytest.raises(ValueError, match="DoRA"):
        logit_grad_strength(dora, ids, attn, token_mask, StrengthConfig(method="loop"))


def test_bad_config_names_the_key_and_missing_peft_names_the_extra(monkeypatch):
    with pytest.raises(ValueError, match="model.lora.r"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="model.lora.alpha"):
        LoRAConfig(alpha=-1)
    with pytest.raises(ValueError, match="model.lora.dropout"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="model.lora.target_modules"):
        LoRAConfig(target_modules=[])
    base, _ = load_policy("tiny-qwen2", ARCH)
    with pytest.raises(ValueError, match="model.lora.target_modules"):
        apply_lora(base, LoRAConfig(target_modules=["no_such_proj"]))
    with pytest.raises(ValueError, match="lm_head"):
        LoRAConfig(target_modules=["q_proj", "lm_head"])
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ImportError, match=r"corrpo\[lora\]"):
        apply_lora(base, LoRAConfig())


def test_lora_run_trains_adapters_only_measures_the_inversion_and_exports(tmp_path):
    cli = run_tiny(
        tmp_path,
        "--trainer.logger=false",
        "--model.lora.r=4",
        "--model.lora.alpha=8",
        "--model.sft.steps=4",
        "--model.rl.steps=2",
        "--model.rl.beta=0.05",
        "--model.rl.inversion.coef=0.5",
        "--model.rl.inversion.min_tokens=2",
    )
    module = cli.model
    hp = module.hparams
    # the run's initial policy, rebuilt: same base seed, same LoRA init seed
    tiny, lora = (c if isinstance(c, t) else t(**c) for c, t in ((hp.tiny, TinyArchitecture), (hp.lora, LoRAConfig)))
    assert lora.r == 4 and lora.alpha == 8
    initial, _ = load_policy(hp.policy, tiny, hp.dtype, seed=hp.seed)
    initial = apply_lora(initial, lora, hp.seed).state_dict()
    final = module.policy.state_dict()
    assert final.keys() == initial.keys()
    adapters = [k for k in final if ".lora_" in k]
    assert adapters and all(not torch.equal(final[k], initial[k]) for k in adapters if ".lora_B." in k)
    assert all(torch.equal(final[k], initial[k]) for k in final if ".lora_" not in k)  # the base is frozen
    # the KL reference is the policy as RL started: SFT-trained adapters, not the final ones
    ref = module.ref_policy.state_dict()
    assert any(not torch.equal(ref[k], initial[k]) for k in adapters)
    assert any(not torch.equal(ref[k], final[k]) for k in adapters)
    assert module.skipped_updates == 0

    run_dir = tmp_path / next(p.name for p in tmp_path.iterdir() if p.is_dir())
    rows = list(csv.DictReader((run_dir / "emergence.csv").open()))
    assert {r["event"] for r in rows} >= {"start", "boundary", "end"}
    assert all(math.isfinite(float(r["spearman"])) for r in rows)
    exported, tok = load_policy(str(run_dir / "policy"))
    ids = torch.tensor([tok("4 +3 *2 -5 =", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(ids).logits, module.policy.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    assert (run_dir / "policy" / "adapter" / "adapter_config.json").is_file()


def test_lora_run_resumes_exactly(tmp_path):
    steps = ["--trainer.logger=false", "--model.lora.r=4", "--model.sft.steps=2", "--model.rl.steps=2"]
    steps += ["--model.rl.inversion.coef=0.5", "--model.rl.lr=1e-3"]
    whole = run_tiny(tmp_path / "whole", *steps).model.policy.state_dict()
    first = run_tiny(tmp_path / "split", *steps, "--trainer.max_steps=3").model.policy.state_dict()
    second = run_tiny(tmp_path / "split", *steps, "--ckpt_path=last").model.policy.state_dict()
    assert max((whole[k] - first[k]).abs().max().item() for k in whole) > 1e-4  # the last step moved something
    assert max((whole[k] - second[k]).abs().max().item() for k in whole) <= 1e-6
