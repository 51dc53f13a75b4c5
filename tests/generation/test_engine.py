"""The generation engine against the plain path: greedy tokens equal `qlora.generate.generate` (one forward per
token over a left-padded batch), requests independent of their neighbours and arrival, stops, limits,
cancellation, a worker thread (CPU, stories260K and SmolLM2)."""

import threading

import pytest
import torch

import qlora
from qlora.generate import generate
from qlora.generation import Engine, SamplingParams


@pytest.fixture(scope="module")
def stories(stories260k_dir):
    return qlora.load(stories260k_dir, quant_type="nf4", compute_dtype="float32", device="cpu")


PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park. They saw", "One day"]


def _plain_tokens(loaded, prompts, n):
    """The plain path's greedy new token ids (decoded text re-encoded would be lossy: compare ids)."""
    tok = loaded.tokenizer
    out = []
    for p in prompts:  # one at a time: no padding in the reference either
        ids = torch.tensor([tok.encode(p, add_bos=tok.add_bos and tok.bos_id is not None)])
        cache = loaded.model.new_kv_cache(1, ids.shape[1] + n)
        with torch.no_grad():
            logits = loaded.model(ids, kv_cache=cache)[:, -1]
            new = []
            for _ in range(n):
                t = int(logits.argmax(-1))
                if t == tok.eos_id:
                    break
                new.append(t)
                logits = loaded.model(torch.tensor([[t]]), kv_cache=cache)[:, -1]
        out.append(new)
    return out


def test_greedy_equals_the_plain_path_token_for_token(stories):
    want = _plain_tokens(stories, PROMPTS, 64)
    engine = Engine(stories.model, stories.tokenizer, slots=3, max_len=160)  # fewer slots than prompts
    got = engine.generate(PROMPTS, SamplingParams(max_new_tokens=64))
    assert [c.token_ids for c in got] == want
    assert all(c.finish_reason in ("stop", "length") for c in got)
    texts = generate(stories.model, stories.tokenizer, PROMPTS, max_new_tokens=64)  # the batched plain path
    assert [c.text for c in got] == texts


def test_a_request_does_not_depend_on_its_neighbours_or_when_it_arrives(stories):
    sampled = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, top_k=40, seed=7)
    alone = Engine(stories.model, stories.tokenizer, slots=1, max_len=96).generate([PROMPTS[2]], sampled)[0]
    engine = Engine(stories.model, stories.tokenizer, slots=4, max_len=96)
    early = [engine.submit(p, SamplingParams(max_new_tokens=30, temperature=1.0, seed=i)) for i, p in
             enumerate(PROMPTS[:2])]  # fmt: skip
    for _ in range(5):
        engine.step()
    late = engine.submit(PROMPTS[2], sampled)  # joins a batch already decoding
    engine.run_until_idle()
    assert late.completion().token_ids == alone.token_ids
    assert all(r.done for r in early)
    other_seed = Engine(stories.model, stories.tokenizer, slots=1, max_len=96).generate(
        [PROMPTS[2]], SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, top_k=40, seed=8))[0]
    assert other_seed.token_ids != alone.token_ids  # the seed matters (negative control)


def test_limits_stop_ids_and_stop_strings(stories):
    engine = Engine(stories.model, stories.tokenizer, slots=2, max_len=40)
    first = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=30))[0]
    assert first.finish_reason == "length" and len(first.token_ids) == 30
    prompt_len = len(stories.tokenizer.encode(PROMPTS[0], add_bos=True))
    capped = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=200))[0]
    assert capped.finish_reason == "length" and prompt_len + len(capped.token_ids) == 40
    # a stop id: the third generated token ends it (and is not part of the output)
    third = first.token_ids[2]
    stopped = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=30, stop_token_ids=(third,)))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == first.token_ids[: first.token_ids.index(third)]
    # a stop string taken from the middle of the greedy text
    words = first.text.split()
    stop = " " + words[3]
    cut = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=30, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == first.text[: first.text.index(stop)]
    with pytest.raises(ValueError, match="holds 40 positions"):
        engine.submit("x " * 60)


def test_streamed_deltas_add_up_to_the_text_and_never_show_a_stop_string(stories):
    engine = Engine(stories.model, stories.tokenizer, slots=2, max_len=96)
    whole = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=40))[0].text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 5]
    seen = []
    request = engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=40, stop=(stop,)), listener=seen.append)
    engine.run_until_idle()
    deltas = list(request.deltas())
    assert seen[-1] is None and seen[:-1] == deltas and len(deltas) > 3
    assert "".join(deltas) == request.completion().text == whole[: whole.index(stop)]


def test_cancel_frees_the_slot_and_a_worker_thread_serves_requests(stories):
    engine = Engine(stories.model, stories.tokenizer, slots=1, max_len=96).start()
    try:
        long = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=80))
        next(long.deltas(timeout=60))  # it is running
        long.cancel()
        assert long.completion(timeout=60).finish_reason == "cancelled"
        done = threading.Event()
        follow = engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=8),
                               listener=lambda d: d is None and done.set())  # fmt: skip
        assert done.wait(60) and follow.completion().finish_reason in ("length", "stop")
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit("x")


def test_smollm2_greedy_equals_the_plain_path_for_64_tokens(smollm2_gguf):
    loaded = qlora.load(smollm2_gguf, quant_type="nf4", compute_dtype="float32", device="cpu")
    prompts = [qlora.generate.render_prompt(loaded.tokenizer, "What is the capital of France?"),
               qlora.generate.render_prompt(loaded.tokenizer, "Write a haiku about rain.")]  # fmt: skip
    want = _plain_tokens(loaded, prompts, 64)
    engine = Engine(loaded.model, loaded.tokenizer, slots=2, max_len=160)
    assert [c.token_ids for c in engine.generate(prompts, SamplingParams(max_new_tokens=64))] == want


@pytest.mark.gpu
def test_on_cuda_the_graphed_decode_equals_the_eager_one_and_the_plain_path(stories260k_dir):
    loaded = qlora.load(stories260k_dir, quant_type="nf4", compute_dtype="bfloat16", device="cuda")
    params = SamplingParams(max_new_tokens=48)
    eager = Engine(loaded.model, loaded.tokenizer, slots=4, max_len=96, cuda_graphs=False).generate(PROMPTS, params)
    graphed = Engine(loaded.model, loaded.tokenizer, slots=4, max_len=96).generate(PROMPTS, params)
    assert [c.token_ids for c in graphed] == [c.token_ids for c in eager]
    sampled = SamplingParams(max_new_tokens=48, temperature=0.8, top_p=0.95, seed=3)
    a = Engine(loaded.model, loaded.tokenizer, slots=4, max_len=96).generate(PROMPTS, sampled)
    b = Engine(loaded.model, loaded.tokenizer, slots=2, max_len=96).generate(PROMPTS, sampled)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]  # reproducible whatever the batch
    plain = _plain_tokens(loaded, PROMPTS, 48)
    agree = [sum(x == y for x, y in zip(c.token_ids, p, strict=False)) / max(len(p), 1)
             for c, p in zip(eager, plain, strict=True)]  # fmt: skip
    assert min(agree) > 0.5, agree  # bf16: the 4-bit kernel sums in another order; near-ties may flip later tokens


def _write_random_adapter(model_dir, directory, seed: int, r: int):
    from qlora.adapter import save_adapter
    from qlora.lora import LoraSpec, lora_layers

    spec = LoraSpec(r=r, alpha=2.0 * r, dropout=0.0)
    model = qlora.load_model(model_dir, "nf4", compute_dtype=torch.float32, device="cpu", lora=spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.5)
    save_adapter(model, directory, spec, str(model_dir))
    return directory


def test_several_adapters_on_one_base_each_request_its_own(stories260k_dir, tmp_path):
    a = _write_random_adapter(stories260k_dir, tmp_path / "a", seed=1, r=4)
    b = _write_random_adapter(stories260k_dir, tmp_path / "b", seed=2, r=8)
    params = SamplingParams(max_new_tokens=24)

    def alone(adapter_dir):
        loaded = qlora.load(stories260k_dir, adapter_dir, quant_type="nf4", compute_dtype="float32", device="cpu")
        return Engine(loaded.model, loaded.tokenizer, slots=1, max_len=64).generate([PROMPTS[0]], params)[0].token_ids

    want = {"a": alone(a), "b": alone(b), None: alone(None)}
    assert len({tuple(t) for t in want.values()}) == 3  # the adapters change the answer
    base = qlora.load(stories260k_dir, quant_type="nf4", compute_dtype="float32", device="cpu")
    engine = Engine(base.model, base.tokenizer, slots=3, max_len=64, adapters={"a": a, "b": b})
    assert engine.adapter_names == ["a", "b"]
    requests = {name: engine.submit(PROMPTS[0], params, adapter=name) for name in ("a", None, "b")}  # one batch
    engine.run_until_idle()
    assert {name: r.completion().token_ids for name, r in requests.items()} == want
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        engine.submit(PROMPTS[0], params, adapter="c")
    engine.close()
    assert all(layer.serving is None for layer in qlora.lora.lora_layers(base.model).values())
