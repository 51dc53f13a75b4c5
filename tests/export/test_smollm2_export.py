"""Exports from a GGUF base (SmolLM2-135M-Instruct, Q4_1): the HF directory `qlora merge` writes
(config from the GGUF metadata, tokenizer.json + chat template rebuilt from it) loads in
transformers, and `qlora export-gguf` keeps the source's tokenizer metadata byte for byte.

Tolerance: float32 on both sides, 30 layers, logits up to ~28: merged (W + s*B*A) against a
separate adapter branch measured max |diff| 1.3e-4; asserted at 1e-3.
"""

import gguf
import pytest
import torch

import qlora
from qlora.adapter import load_adapter_weights
from qlora.export.gguf_export import export_gguf
from qlora.export.merge import merge
from qlora.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # SmolLM2 loads and merges: ~15-30 s per test on the 2-core CPU
IDS = torch.tensor([[1, 504, 3458, 282, 253, 1345, 28, 2]])
TOL = {"rtol": 1e-3, "atol": 1e-3}


@pytest.fixture(scope="module")
def smollm2_with_adapter(smollm2_gguf, tmp_path_factory, make_adapter):
    adapter = tmp_path_factory.mktemp("smollm2") / "adapter"
    lora = make_adapter(smollm2_gguf, adapter)
    model = qlora.load_model(smollm2_gguf, None, compute_dtype=torch.float32, device="cpu", lora=lora)
    load_adapter_weights(model, adapter)
    with torch.no_grad():
        return adapter, model(IDS)


def test_merge_of_a_gguf_base_loads_in_transformers(smollm2_gguf, smollm2_with_adapter, tmp_path):
    transformers = pytest.importorskip("transformers")
    adapter, reference = smollm2_with_adapter
    out = merge(smollm2_gguf, adapter, tmp_path / "merged", dtype=torch.float32, onto="original")
    with torch.no_grad():
        logits = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(IDS).logits
    torch.testing.assert_close(logits, reference, **TOL)
    theirs, ours = transformers.AutoTokenizer.from_pretrained(out), Tokenizer.from_pretrained(smollm2_gguf)
    text = "Hello world! Let's count: 12345 apples, naïve café.\n\tTabs too."
    assert theirs(text, add_special_tokens=False).input_ids == ours.encode(text)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    rendered = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ours.apply_chat_template(messages) and "<|im_start|>assistant" in rendered


def test_export_gguf_of_a_gguf_base_keeps_its_tokenizer(smollm2_gguf, smollm2_with_adapter, tmp_path):
    adapter, reference = smollm2_with_adapter
    out = export_gguf(smollm2_gguf, adapter, tmp_path / "m.gguf", kind="f32", onto="original")
    source, written = gguf.GGUFReader(smollm2_gguf), gguf.GGUFReader(out)
    tokenizer_keys = [k for k in source.fields if k.startswith("tokenizer.")]
    assert "tokenizer.chat_template" in tokenizer_keys and "tokenizer.ggml.merges" in tokenizer_keys
    for key in tokenizer_keys:
        assert written.fields[key].contents() == source.fields[key].contents(), key
    for key in ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv",
                "rope.freq_base", "attention.layer_norm_rms_epsilon", "context_length"):  # fmt: skip
        assert written.fields[f"llama.{key}"].contents() == source.fields[f"llama.{key}"].contents(), key
    with torch.no_grad():
        logits = qlora.load_model(out, None, compute_dtype=torch.float32, device="cpu")(IDS)
    torch.testing.assert_close(logits, reference, **TOL)
