"""Sliding-window perplexity: each token scored once, and the same number transformers computes.

The reference is transformers' own loss (`LlamaForCausalLM(..., labels=...)`) run through the
perplexity guide's loop (labels -100 over each window's overlap), each window's mean loss weighted
by the number of tokens it really scores. Tolerance 1e-5 relative: both sides run in fp32 and our
logits equal transformers' to ~1e-6 (tests/model); the issue asks for 1e-3, so this is stricter.
"""

import pytest
import torch

import qlora
from qlora.eval.perplexity import perplexity, window_spans
from qlora.lora import LoRALinear, LoraSpec
from qlora.tokenizer import Tokenizer

REL = 1e-5


@pytest.mark.parametrize(("n", "max_length", "stride"), [(10, 6, 3), (100, 16, 16), (100, 16, 5), (7, 32, 8),
                                                          (33, 8, 1), (2, 2, 1)])  # fmt: skip
def test_every_token_is_scored_once_with_context_inside_its_window(n, max_length, stride):
    scored = []
    for begin, end, first in window_spans(n, max_length, stride):
        assert begin < first < end and end - begin <= max_length  # the predictor of `first` is in the window
        scored += range(first, end)
    if stride < max_length:
        assert scored == list(range(1, n))
    else:  # disjoint windows: each window's first token has no predictor (transformers' guide does the same)
        assert scored == [i for i in range(1, n) if i % stride]


def test_bad_window_arguments_are_refused():
    with pytest.raises(ValueError, match="stride"):
        window_spans(100, 16, 17)
    with pytest.raises(ValueError, match="max_length"):
        window_spans(100, 1, 1)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        window_spans(1, 16, 8)


@pytest.fixture(scope="module")
def wiki_ids(shared_dir, stories260k_dir):
    text = (shared_dir / "data/text/wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8")[:6000]
    tok = Tokenizer.from_pretrained(stories260k_dir)
    return [tok.bos_id, *tok.encode(text)]


def transformers_guide_nll(hf_model, ids, max_length, stride):
    """The perplexity guide's loop with transformers' loss; windows weighted by their scored tokens."""
    ids = torch.tensor(ids)[None]
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + max_length, ids.shape[1])
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, : -(end - prev_end)] = -100
        n_scored = int((labels[:, 1:] != -100).sum())  # labels shift by one inside the loss
        with torch.no_grad():
            loss = hf_model(window, labels=labels).loss
        total += float(loss) * n_scored
        count += n_scored
        prev_end = end
        if end == ids.shape[1]:
            break
    return total / count, count


@pytest.mark.parametrize(("max_length", "stride"), [(256, 128), (512, 512), (200, 64)])
def test_dense_stories260k_matches_transformers_loss(stories260k_dir, wiki_ids, max_length, stride):
    transformers = pytest.importorskip("transformers")
    ours = qlora.load_model(stories260k_dir, quant_type=None, compute_dtype=torch.float32, device="cpu")
    theirs = transformers.LlamaForCausalLM.from_pretrained(stories260k_dir, dtype=torch.float32).eval()
    result = perplexity(ours, wiki_ids, max_length=max_length, stride=stride)
    ref_nll, ref_count = transformers_guide_nll(theirs, wiki_ids, max_length, stride)
    assert result.tokens == ref_count
    assert result.tokens == len(wiki_ids) - 1 - (len(wiki_ids) - 1) // stride * (stride == max_length)
    assert result.nll == pytest.approx(ref_nll, rel=REL)
    assert result.perplexity == pytest.approx(torch.tensor(ref_nll).double().exp().item(), rel=REL)


def test_nf4_base_with_adapter_matches_transformers_with_the_merged_weights(stories260k_dir, wiki_ids):
    """Base + adapter: our NF4 model with a non-zero adapter == transformers with W = deq(W4) + s * B A."""
    transformers = pytest.importorskip("transformers")
    ours = qlora.load_model(stories260k_dir, "nf4", compute_dtype=torch.float32, device="cpu",
                            lora=LoraSpec(r=4, alpha=8, dropout=0.0))  # fmt: skip
    theirs = transformers.LlamaForCausalLM.from_pretrained(stories260k_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    modules = dict(theirs.named_modules())
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.weight.normal_(0, 0.05)  # non-zero B: the adapter really acts
                delta = layer.scale * layer.lora_B.weight @ layer.lora_A.weight
                modules[name].weight.copy_(layer.dense_base_weight(torch.float32) + delta)
    ids = wiki_ids[:1500]
    result = perplexity(ours, ids, max_length=256, stride=128)
    ref_nll, _ = transformers_guide_nll(theirs, ids, 256, 128)
    assert result.nll == pytest.approx(ref_nll, rel=REL)
    plain = transformers.LlamaForCausalLM.from_pretrained(stories260k_dir, dtype=torch.float32).eval()
    assert abs(transformers_guide_nll(plain, ids, 256, 128)[0] - ref_nll) > 100 * REL * ref_nll  # negative control


def test_one_window_equals_a_single_forward_cross_entropy(stories260k_dir, wiki_ids):
    ours = qlora.load_model(stories260k_dir, quant_type=None, compute_dtype=torch.float32, device="cpu")
    ids = torch.tensor(wiki_ids[:300])
    with torch.no_grad():
        direct = torch.nn.functional.cross_entropy(ours(ids[None])[0, :-1], ids[1:]).item()
    assert perplexity(ours, ids, max_length=512, stride=512).nll == pytest.approx(direct, rel=1e-6)
    # overlapping windows give the later tokens more context than disjoint ones: a different number
    assert perplexity(ours, ids, max_length=64, stride=16).nll != pytest.approx(
        perplexity(ours, ids, max_length=64, stride=64).nll, rel=1e-4
    )
