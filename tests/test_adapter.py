"""Adapters in PEFT's format: PEFT loads ours onto transformers' model with the same logits, and back."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlora
from qlora.adapter import (
    AdapterError,
    adapter_config,
    load_adapter_weights,
    read_adapter,
    read_adapter_config,
    save_adapter,
)
from qlora.lora import LoRALinear, LoraSpec, lora_layers

IDS = torch.tensor([[1, 403, 407, 261, 378, 30, 5, 60, 2]])


def adapted_model(path, quant_type, seed=0):
    lora = LoraSpec(r=4, alpha=8, dropout=0.0)
    model = qlora.load_model(path, quant_type, compute_dtype=torch.float32, device="cpu", lora=lora)
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():  # non-zero B: a zero adapter would prove nothing
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    return model, lora


@pytest.mark.parametrize("quant_type", [None, "nf4"])
def test_peft_loads_our_adapter_with_the_same_logits(stories260k_dir, tmp_path, quant_type):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    ours, lora = adapted_model(stories260k_dir, quant_type)
    save_adapter(ours, tmp_path, lora, str(stories260k_dir))
    base = transformers.LlamaForCausalLM.from_pretrained(stories260k_dir).eval()
    if quant_type is not None:  # the same 4-bit base on both sides: copy our dequantized weights in
        modules = dict(base.named_modules())
        with torch.no_grad():
            for name, layer in ours.named_modules():
                if isinstance(layer, LoRALinear):
                    modules[name].weight.copy_(layer.dense_base_weight(torch.float32))
    with torch.no_grad():
        base_logits = base(IDS).logits.clone()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        ours_logits, theirs_logits = ours(IDS), theirs(IDS).logits
    # Same float32 maths in another order (PEFT adds the two branches after separate matmuls).
    torch.testing.assert_close(ours_logits, theirs_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(theirs_logits, base_logits, atol=1e-3)  # the adapter did change the output


def test_peft_saved_adapter_loads_into_ours(stories260k_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.LlamaForCausalLM.from_pretrained(stories260k_dir).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    theirs = peft.get_peft_model(base, config).eval()
    theirs.save_pretrained(tmp_path)
    spec = read_adapter_config(tmp_path)
    assert spec.r == 4 and spec.alpha == 8 and set(spec.targets) == {"q_proj", "v_proj", "down_proj"}
    ours = qlora.load_model(stories260k_dir, None, compute_dtype=torch.float32, device="cpu", lora=spec)
    load_adapter_weights(ours, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(IDS).logits, rtol=1e-5, atol=1e-5)


def test_adapter_files_and_errors(stories260k_dir, tmp_path):
    ours, lora = adapted_model(stories260k_dir, "nf4")
    save_adapter(ours, tmp_path / "a", lora, "base-path")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["base_model_name_or_path"] == "base-path"
    other = qlora.load_model(stories260k_dir, "nf4", compute_dtype=torch.float32, device="cpu",
                             lora=LoraSpec(r=8, dropout=0.0))  # fmt: skip
    with pytest.raises(AdapterError, match="lora_A.weight has shape"):
        load_adapter_weights(other, tmp_path / "a")
    with pytest.raises(AdapterError, match="adapter_config.json: not found"):
        read_adapter_config(tmp_path)


# ------------------------------------------------------------------ rank_pattern / alpha_pattern (PEFT's)

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Keys of every form PEFT matches: a suffix of dotted parts, an anchored regex, alternation, a character
# class. Two alpha keys match layer 0's q_proj: the first in the file's order wins (PEFT's rule).
RANK_PATTERN = {"layers.0.self_attn.q_proj": 8, "down_proj": 2, r"^model\.layers\.1\.mlp\.(gate|up)_proj": 6}
ALPHA_PATTERN = {"layers.0.self_attn.q_proj": 4, r"layers\.[23]\.self_attn\.(k|v)_proj": 32, "o_proj": 2,
                 "q_proj": 16}  # fmt: skip


def peft_pattern_adapter(model_dir, directory, use_rslora=False, **overrides):
    """A PEFT-saved adapter with rank and alpha patterns, B drawn non-zero; returns PEFT's model of it
    as PEFT loads it from disk (`PeftModel.from_pretrained`: the reference users get)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_TARGETS, rank_pattern=RANK_PATTERN,
                  alpha_pattern=ALPHA_PATTERN, use_rslora=use_rslora, task_type="CAUSAL_LM")  # fmt: skip
    made = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(model_dir),
                               peft.LoraConfig(**{**config, **overrides}))  # fmt: skip
    with torch.no_grad():
        for name, p in made.named_parameters():
            if ".lora_B." in name:  # non-zero B (a zero adapter would prove nothing), small like a trained one
                p.normal_(std=0.05)
    made.save_pretrained(directory)
    base = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    return peft.PeftModel.from_pretrained(base, directory).eval()


def peft_layers(peft_model):
    """{module name: (r, scale)} of PEFT's LoRA layers."""
    layers = {}
    for name, m in peft_model.named_modules():
        if isinstance(getattr(m, "scaling", None), dict) and m.scaling:  # (attention has a float `scaling`)
            layers[name.removeprefix("base_model.model.")] = (m.r["default"], m.scaling["default"])
    return layers


def ours_from(model_dir, adapter_dir, **spec_changes):
    spec = dataclasses.replace(read_adapter_config(adapter_dir), **spec_changes)
    model = qlora.load_model(model_dir, None, compute_dtype=torch.float32, device="cpu", lora=spec)
    load_adapter_weights(model, adapter_dir)
    return model


# Both sides float32 on the same dense base; the adapter branch is added after its own matmuls in PEFT,
# inside ours: measured max |diff| 1.1e-5 on logits up to 17 (float32 ulp there 2e-6), while the
# adapter moves the logits by ~10.
PATTERN_TOL = {"rtol": 1e-5, "atol": 5e-5}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_pattern_adapter_loads_with_peft_logits(stories260k_dir, tmp_path, use_rslora):
    theirs = peft_pattern_adapter(stories260k_dir, tmp_path, use_rslora)
    spec = read_adapter_config(tmp_path)
    assert spec.use_rslora is use_rslora and dict(spec.rank_pattern) == RANK_PATTERN
    ours = ours_from(stories260k_dir, tmp_path)
    # every layer's rank and scale are PEFT's (the matching rule itself, layer by layer)
    assert {n: (m.r, pytest.approx(m.scale)) for n, m in lora_layers(ours).items()} == peft_layers(theirs)
    assert lora_layers(ours)["model.layers.0.self_attn.q_proj"].r == 8  # the patterns did apply
    with torch.no_grad():
        theirs_logits, ours_logits = theirs(IDS).logits, ours(IDS)
        with theirs.disable_adapter():
            base_logits = theirs(IDS).logits
    torch.testing.assert_close(ours_logits, theirs_logits, **PATTERN_TOL)
    assert (theirs_logits - base_logits).abs().max() > 1.0  # the adapter matters

    # Negative controls: without alpha_pattern the same tensors give other logits (the silent bug);
    # without rank_pattern they do not even fit, and the error says which layer and why.
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "alpha_pattern": {}}))
    with torch.no_grad():
        assert (ours_from(stories260k_dir, tmp_path)(IDS) - theirs_logits).abs().max() > 0.1
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {}}))
    with pytest.raises(AdapterError, match=r"_proj has lora_A \[[268], \d+\].*gives it rank 4 \(r, rank_pattern\)"):
        ours_from(stories260k_dir, tmp_path)


def test_pattern_rule_is_peft_rule():
    get_pattern_key = pytest.importorskip("peft.utils.other").get_pattern_key
    names = [f"model.layers.{i}.{part}" for i in (0, 1, 12) for part in
             ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "mlp.up_proj")]  # fmt: skip
    patterns = ["q_proj", "proj", ".*proj", "layers.1.self_attn.q_proj", "1.self_attn.q_proj", r"^model\.layers\.1\..*",
                "layers.1", r"layers\.1\d?\.mlp\.(up|down)_proj", "self_attn.(q|k)_proj", "mlp"]  # fmt: skip
    for pattern in patterns:
        for name in names:
            expected = 7 if get_pattern_key([pattern], name) == pattern else None
            assert LoraSpec.pattern_value(((pattern, 7),), name) == expected, (pattern, name)
    ranks, alphas = {"layers.1.self_attn.q_proj": 2, "q_proj": 6}, {"mlp.up_proj": 3}
    spec = LoraSpec(r=4, alpha=8, rank_pattern=ranks, alpha_pattern=alphas)
    assert spec.for_layer("model.layers.1.self_attn.q_proj").r == 2  # the first match wins
    assert spec.for_layer("model.layers.0.self_attn.q_proj").r == 6
    up = spec.for_layer("model.layers.0.mlp.up_proj")
    assert (up.r, up.alpha, up.scale) == (4, 3, 3 / 4)
    plain = dataclasses.replace(spec, rank_pattern=(), alpha_pattern=())
    assert spec.for_layer("model.layers.0.mlp.down_proj") == plain
    assert hash(spec) == hash(LoraSpec(r=4, alpha=8, rank_pattern=tuple(ranks.items()), alpha_pattern=alphas))


def test_pattern_adapter_round_trips_through_our_save_and_peft(stories260k_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    # Order matters: "q_proj" first takes every q_proj, layer 1's too (PEFT's rule); a save that sorted the
    # keys would give layer 1 rank 6 on reload, and PEFT would refuse our r-2 tensors.
    lora = LoraSpec(r=4, alpha=8, dropout=0.0, rank_pattern={"q_proj": 2, "layers.1.self_attn.q_proj": 6},
                    alpha_pattern={r"layers\.[01]\.mlp\..*": 24})  # fmt: skip
    ours = qlora.load_model(stories260k_dir, None, compute_dtype=torch.float32, device="cpu", lora=lora)
    torch.manual_seed(0)
    for layer in lora_layers(ours).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    assert lora_layers(ours)["model.layers.1.self_attn.q_proj"].r == 2
    save_adapter(ours, tmp_path, lora, str(stories260k_dir))
    spec = read_adapter_config(tmp_path)
    assert (spec.rank_pattern, spec.alpha_pattern) == (lora.rank_pattern, lora.alpha_pattern)
    theirs = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(stories260k_dir), tmp_path)
    assert {n: (m.r, pytest.approx(m.scale)) for n, m in lora_layers(ours).items()} == peft_layers(theirs.eval())
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(IDS).logits, **PATTERN_TOL)


def test_resume_keeps_per_layer_ranks_and_alphas(stories260k_dir, tmp_path):
    """What `lora.init_from` does: the spec from the adapter (this run's dropout and dtype), the model built
    with it, the tensors copied in; saving again writes the same adapter."""
    peft_pattern_adapter(stories260k_dir, tmp_path / "peft")
    start = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    model = ours_from(stories260k_dir, tmp_path / "peft", dropout=0.1)
    ranks = {n: m.r for n, m in lora_layers(model).items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 8 and ranks["model.layers.1.mlp.up_proj"] == 6
    assert ranks["model.layers.3.mlp.down_proj"] == 2 and ranks["model.layers.3.mlp.up_proj"] == 4
    spec = dataclasses.replace(read_adapter_config(tmp_path / "peft"), dropout=0.1)
    save_adapter(model, tmp_path / "again", spec, str(stories260k_dir))
    again = read_adapter_config(tmp_path / "again")
    assert (again.rank_pattern, again.alpha_pattern) == (spec.rank_pattern, spec.alpha_pattern)
    saved = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert saved.keys() == start.keys()
    for key, value in start.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0, msg=key)
    # a spec that drops the patterns (what rebuilding LoraSpec from r and alpha alone would do) is refused
    with pytest.raises(AdapterError, match="rank_pattern"):
        ours_from(stories260k_dir, tmp_path / "peft", rank_pattern=(), alpha_pattern=())
    with pytest.raises(AdapterError, match=r"scale .* alpha_pattern"):
        ours_from(stories260k_dir, tmp_path / "again", alpha_pattern=())


def write_config(directory, **fields):
    """A copy of the adapter in `directory` whose config has `fields` changed (None: removed)."""
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg = {k: v for k, v in {**cfg, **fields}.items() if v is not None or k not in fields}
    (directory / "adapter_config.json").write_text(json.dumps(cfg))


REFUSED = [
    ("use_dora", True),
    ("target_modules", "q_proj|v_proj"),
    ("target_modules", []),
    ("layers_to_transform", [0, 1]),
    ("layers_pattern", "layers"),
    ("bias", "all"),
    ("bias", "lora_only"),
    ("modules_to_save", ["lm_head"]),
    ("fan_in_fan_out", True),
    ("lora_bias", True),
    ("use_qalora", True),
    ("exclude_modules", ["o_proj"]),
    ("trainable_token_indices", [1, 2]),
    ("layer_replication", [[0, 2]]),
    ("target_parameters", ["mlp.experts.down_proj"]),
    ("megatron_config", {"tensor_model_parallel_size": 2}),
    ("alora_invocation_tokens", [5]),
    ("init_lora_weights", "pissa"),
    ("init_lora_weights", "loftq"),
    ("peft_type", "LOHA"),
    ("a_future_peft_field", {"on": True}),
    ("r", 0),
    ("r", 4.5),
    ("lora_alpha", "16"),
    ("rank_pattern", {"q_proj": 0}),
    ("rank_pattern", {"q_proj(": 2}),
    ("alpha_pattern", ["q_proj"]),
    ("use_rslora", "yes"),
    ("lora_dropout", 1.0),
]


@pytest.mark.parametrize(("field", "value"), REFUSED, ids=[f"{f}={v}" for f, v in REFUSED])
def test_unsupported_fields_are_refused_naming_file_and_field(stories260k_dir, tmp_path, field, value):
    lora = LoraSpec(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj"))
    model = qlora.load_model(stories260k_dir, None, compute_dtype=torch.float32, device="cpu", lora=lora)
    save_adapter(model, tmp_path, lora, "base")
    write_config(tmp_path, **{field: value})
    path = str(tmp_path / "adapter_config.json")
    with pytest.raises(AdapterError) as info:
        read_adapter_config(tmp_path)
    assert path in str(info.value) and field in str(info.value)
    with pytest.raises(AdapterError, match=field):  # loading reads the same config
        load_adapter_weights(model, tmp_path)


def test_fields_without_effect_are_accepted(stories260k_dir, tmp_path):
    lora = LoraSpec(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj"))
    model = qlora.load_model(stories260k_dir, None, compute_dtype=torch.float32, device="cpu", lora=lora)
    save_adapter(model, tmp_path, lora, "base")
    write_config(tmp_path, task_type="FEATURE_EXTRACTION", inference_mode=False, init_lora_weights="gaussian",
                 megatron_core="megatron.core", qalora_group_size=16, loftq_config={}, a_future_peft_field=None,
                 use_dora=False, layers_to_transform=None, bias="none", peft_version="0.99")  # fmt: skip
    assert read_adapter_config(tmp_path) == lora
    load_adapter_weights(model, tmp_path)


def test_tensors_other_than_lora_a_and_b_are_refused(tmp_path):
    lora = LoraSpec(r=2, alpha=4, dropout=0.0, targets=("q_proj",))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, 2),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(8)},
              str(tmp_path / "adapter_model.safetensors"))  # fmt: skip
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter_config(lora, "base")))
    with pytest.raises(AdapterError, match="adapter_model.safetensors: tensor .*lora_magnitude_vector.* not a LoRA"):
        read_adapter(tmp_path)
