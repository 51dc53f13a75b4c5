"""`qlora export-gguf`: the file reads back with the `gguf` package (tensors and metadata), and
loads with the same logits through our GGUF loader and through transformers' own GGUF loader.

llama.cpp itself is not tested: `llama-cpp-python` has no prebuilt wheel on PyPI (only an sdist
that compiles llama.cpp), so it is not installable from the registry in reasonable time here.

Tolerances. F32 export: the file holds exactly the merged float32 weights; against base + adapter
evaluated with a separate adapter branch the logits differ by float32 reordering only (measured
<= 3.5e-5, asserted 1e-4, as in test_merge.py); our loader against transformers' GGUF loader on
the same file: measured 0.0, asserted 1e-5. Q8_0: KL(f32 || q8_0) on random tokens, mean nats per
token on stories260K with the test's random adapter: measured 1.9e-3 (5.6e-4 with a 3-step trained
adapter), asserted < 1e-2; F16 measured 3.3e-6, asserted < 1e-5.
"""

import json

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qlora
from qlora.adapter import load_adapter_weights
from qlora.checkpoint_io.gguf_file import gguf_to_hf_name
from qlora.cli import main
from qlora.export.gguf_export import export_gguf
from qlora.export.merge import MergeError, TrainedBase, merged_weights
from qlora.tokenizer import Tokenizer

IDS = torch.tensor([[1, 403, 407, 261, 378, 30, 5, 60, 2]])
RANDOM_IDS = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(0))


def field(reader, key):
    return reader.fields[key].contents()


def llama_cpp_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permutation, written out independently of qlora's."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_package_reads_back_tensors_and_metadata(stories260k_dir, tmp_path, make_adapter):
    make_adapter(stories260k_dir, tmp_path / "adapter")
    out = export_gguf(stories260k_dir, tmp_path / "adapter", tmp_path / "m.gguf", kind="f16")
    reader = gguf.GGUFReader(out)
    config = json.loads((stories260k_dir / "config.json").read_text())
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    for key, expected in [("block_count", 5), ("embedding_length", 64), ("feed_forward_length", 172),
                          ("attention.head_count", 8), ("attention.head_count_kv", 4), ("context_length", 512),
                          ("rope.dimension_count", 8), ("vocab_size", 512)]:  # fmt: skip
        assert field(reader, f"llama.{key}") == expected, key
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert field(reader, "llama.rope.freq_base") == pytest.approx(config["rope_theta"])
    sentencepiece = pytest.importorskip("sentencepiece")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(stories260k_dir / "tokenizer.model"))
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")) == (1, 2)

    expected = dict(merged_weights(stories260k_dir, tmp_path / "adapter", "dequantized", TrainedBase()))
    heads = {"attn_q": 8, "attn_k": 4}
    names = set()
    for t in reader.tensors:
        hf = gguf_to_hf_name(t.name)
        names.add(hf)
        want = expected[hf].numpy()
        if t.name.split(".")[-2] in heads:
            want = llama_cpp_rows(want, heads[t.name.split(".")[-2]])
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            np.testing.assert_array_equal(got, want, err_msg=t.name)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, t.name
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=t.name)
    assert names == set(expected) - {"lm_head.weight"}  # tied: llama.cpp reuses token_embd


def test_round_trip_logits_through_our_loader_and_transformers(stories260k_dir, tmp_path, make_adapter):
    transformers = pytest.importorskip("transformers")
    lora = make_adapter(stories260k_dir, tmp_path / "adapter")
    out = export_gguf(stories260k_dir, tmp_path / "adapter", tmp_path / "m.gguf", kind="f32",
                      base=TrainedBase(dtype=torch.float32))  # fmt: skip
    reference = qlora.load_model(stories260k_dir, "nf4", compute_dtype=torch.float32, device="cpu", lora=lora)
    load_adapter_weights(reference, tmp_path / "adapter")
    ours = qlora.load_model(out, None, compute_dtype=torch.float32, device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    plain = qlora.load_model(stories260k_dir, "nf4", compute_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        logits = ours(IDS)
        torch.testing.assert_close(logits, reference(IDS), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs.eval()(IDS).logits, logits, rtol=1e-5, atol=1e-5)
        assert (logits - plain(IDS)).abs().max() > 0.1  # the adapter is in the file
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    text = "Once upon a time, there was a little girl named Lily."
    assert tokenizer(text).input_ids == Tokenizer.from_pretrained(stories260k_dir).encode(text, add_bos=True)


def test_q8_0_and_f16_types_and_their_error(stories260k_dir, tmp_path, make_adapter):
    make_adapter(stories260k_dir, tmp_path / "adapter")
    logits = {}
    for kind in ("f32", "f16", "q8_0"):
        out = tmp_path / f"m-{kind}.gguf"
        rc = main(["export-gguf", "--model", str(stories260k_dir), "--adapter", str(tmp_path / "adapter"),
                   "--output", str(out), "--type", kind])  # fmt: skip
        assert rc == 0
        with torch.no_grad():
            logits[kind] = qlora.load_model(out, None, compute_dtype=torch.float32, device="cpu")(RANDOM_IDS)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m-q8_0.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # 172-wide rows: no 32-blocks
    reference = F.log_softmax(logits["f32"], -1)

    def kl(kind):
        other = F.log_softmax(logits[kind], -1)
        return (reference.exp() * (reference - other)).sum(-1).mean().item()

    assert kl("f16") < 1e-5
    assert 1e-5 < kl("q8_0") < 1e-2  # Q8_0 is lossy (and so measurably not F16), but only slightly


def test_export_errors(stories260k_dir, tmp_path, capsys):
    with pytest.raises(MergeError, match="not supported; choose one of"):
        export_gguf(stories260k_dir, None, tmp_path / "x.gguf", kind="q4_k")
    bpe = tmp_path / "bpe"
    bpe.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bpe / name).write_bytes((stories260k_dir / name).read_bytes())
    (bpe / "tokenizer.json").write_text("{}")
    rc = main(["export-gguf", "--model", str(bpe), "--output", str(tmp_path / "y.gguf")])
    assert rc == 2 and "convert_hf_to_gguf.py" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("llama", {"attention_bias": True, "tie_word_embeddings": False}),  # biases are permuted too
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
        ),  # fmt: skip
        ("mistral", {"sliding_window": 5}),
        ("qwen2", {}),
        ("qwen3", {"head_dim": 32}),
    ],
    ids=["llama-bias-untied", "llama3-rope", "mistral-window", "qwen2", "qwen3"],
)
def test_every_architecture_round_trips(stories260k_dir, tmp_path, model_type, extra):
    """A tiny random transformers model of each family -> GGUF -> our loader: transformers' logits."""
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(model_type, vocab_size=512, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=256, rms_norm_eps=1e-5, **extra)  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # O(1) logits and non-unit norms, so a wrong layout cannot hide
        for name, p in reference.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
    reference.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes((stories260k_dir / "tokenizer.model").read_bytes())
    out = export_gguf(tmp_path / "hf", None, tmp_path / "m.gguf", kind="f32", onto="original")
    arch = gguf.GGUFReader(out).fields["general.architecture"].contents()
    assert arch == {"mistral": "llama"}.get(model_type, model_type)
    ours = qlora.load_model(out, None, compute_dtype=torch.float32, device="cpu")
    assert ours.config.model_type == model_type and ours.config.rope_scaling == qlora.load_model(
        tmp_path / "hf", None, compute_dtype=torch.float32, device="cpu").config.rope_scaling  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(ours(RANDOM_IDS), reference(RANDOM_IDS).logits, rtol=1e-5, atol=1e-5)
