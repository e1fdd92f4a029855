"""corrpo.models.sharding in one process: a 1-rank gloo group is enough for ``fully_shard`` to turn every parameter into
a DTensor, so the gathering helpers (full state dict, gathered copy, vLLM weight sync) are checked here against
the unsharded model they came from; the 2-process runs are tests/test_fsdp2.py. Also the config's errors."""

import copy
import os

import pytest
import torch
import torch.distributed as dist

from corrpo.models.loading import TinyArchitecture, load_policy
from corrpo.models.sharding import ShardingConfig, fsdp_kwargs, full_state_dict, gathered_copy, is_sharded, shard_policy

ARCH = TinyArchitecture(hidden_size=32, num_hidden_layers=2, intermediate_size=64)


@pytest.fixture(scope="module")
def sharded_pair():
    """(the tiny policy, a copy of it sharded by fully_shard over a 1-rank mesh)."""
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=0, world_size=1)
    model, _ = load_policy("tiny-qwen2", ARCH)
    sharded = shard_policy(copy.deepcopy(model), init_device_mesh("cpu", (1,)), ShardingConfig())
    yield model, sharded
    if started:
        dist.destroy_process_group()


def test_every_decoder_layer_and_the_root_are_sharded(sharded_pair):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    model, sharded = sharded_pair
    assert not is_sharded(model) and is_sharded(sharded)
    assert isinstance(sharded, FSDPModule) and all(isinstance(layer, FSDPModule) for layer in sharded.model.layers)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())


def test_the_full_state_dict_is_the_unsharded_weights(sharded_pair):
    model, sharded = sharded_pair
    full, reference = full_state_dict(sharded), model.state_dict()
    assert full.keys() == reference.keys()
    assert all(type(full[k]) is torch.Tensor and torch.equal(full[k], reference[k]) for k in reference)


def test_scores_of_the_gathered_copy_equal_the_unsharded_models(sharded_pair):
    from corrpo.inversion.strength import score_tokens
    from corrpo.inversion.strength_config import StrengthConfig

    model, sharded = sharded_pair
    ids = torch.randint(5, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    mask, tokens = torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    tokens[:, 8:] = True
    for method in ("onepass", "vmap"):
        config = StrengthConfig(method=method)
        with gathered_copy(sharded) as plain:
            assert not is_sharded(plain)
            got = score_tokens(plain, ids, mask, tokens, config)
        want = score_tokens(model, ids, mask, tokens, config)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), method


def test_the_vllm_sync_sends_whole_tensors_gathered_from_the_sharded_policy(sharded_pair):
    from corrpo.generation.vllm import VLLMGenerator

    class Engine:  # what VLLMGenerator calls on a vllm.LLM
        def collective_rpc(self, fn, args):
            self.weights = dict(args[0])

        def reset_prefix_cache(self):
            self.reset = True

    model, sharded = sharded_pair
    generator = object.__new__(VLLMGenerator)  # no vLLM here: skip the import check
    generator.llm = Engine()
    generator.sync_weights(sharded)
    sent, reference = generator.llm.weights, model.state_dict()
    assert sent.keys() == reference.keys() and generator.llm.reset
    assert all(type(sent[k]) is torch.Tensor and torch.equal(sent[k], reference[k]) for k in reference)


def test_the_config_passes_mixed_precision_and_offload_to_fully_shard():
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    assert fsdp_kwargs(ShardingConfig()) == {"reshard_after_forward": True}
    kwargs = fsdp_kwargs(ShardingConfig(param_dtype="bfloat16", reduce_dtype="float32", cpu_offload=True))
    assert kwargs["mp_policy"] == MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    assert isinstance(kwargs["offload_policy"], CPUOffloadPolicy)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"param_dtype": "fp8"}, "model.sharding.param_dtype"), ({"cpu_offload": "yes"}, "model.sharding.cpu_offload")],
)
def test_a_bad_sharding_value_names_its_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ShardingConfig(**kwargs)


def test_sharding_options_without_model_parallel_strategy_are_refused():
    from corrpo.module import CorrPOModule

    module = CorrPOModule(tiny=ARCH, sharding=ShardingConfig(cpu_offload=True))
    with pytest.raises(ValueError, match="model.sharding is set but trainer.strategy is not ModelParallelStrategy"):
        module.configure_model()


def test_lora_and_tensor_parallelism_under_fsdp2_are_refused_by_name(sharded_pair):
    from torch.distributed.device_mesh import init_device_mesh

    from corrpo.models.lora import LoRAConfig
    from corrpo.module import CorrPOModule

    module = CorrPOModule(tiny=ARCH, lora=LoRAConfig(r=2))
    module._device_mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    with pytest.raises(ValueError, match="model.lora with ModelParallelStrategy"):
        module.configure_model()
    with pytest.raises(ValueError, match="tensor_parallel_size must be 1"):
        module._device_mesh = _FakeMesh()
        module.configure_model()


class _FakeMesh:
    """A 2-D mesh whose tensor-parallel dimension has 2 ranks (a real one needs 2 processes)."""

    ndim = 2

    def __getitem__(self, name):
        return type("Dim", (), {"size": lambda self: 2 if name == "tensor_parallel" else 1})()


def test_the_export_of_a_sharded_policy_is_the_unsharded_models_folder(sharded_pair, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from corrpo.models.loading import build_char_tokenizer, export_policy

    model, sharded = sharded_pair
    tokenizer = build_char_tokenizer()
    export_policy(model, tokenizer, tmp_path / "plain")
    export_policy(sharded, tokenizer, tmp_path / "sharded", state_dict=full_state_dict(sharded))
    plain, gathered = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "sharded"))
    assert gathered.keys() == plain.keys() and all(torch.equal(gathered[k], plain[k]) for k in plain)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    ids = torch.arange(5, 25)[None]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_lean_decoder_and_the_shared_forward_leave_a_sharded_policy_to_the_exact_paths(sharded_pair):
    from corrpo.generation.decode_loop import unsupported_reason
    from corrpo.training.corrpo_term import CorrPOTermConfig, shares_update_forward

    model, sharded = sharded_pair
    assert unsupported_reason(model, 64) is None and "FSDP2" in unsupported_reason(sharded, 64)
    config = CorrPOTermConfig(coef=0.1)
    assert shares_update_forward(model, config, 1) is None and "FSDP2" in shares_update_forward(sharded, config, 1)
