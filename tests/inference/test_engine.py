"""The batched engine: per-row positions, continuous batching, per-request sampling, stops, cancellation."""

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.inference.engine import Engine, Request
from gptlab.inference.generation import CANCELLED, LENGTH, STOP, generate
from gptlab.inference.sampling import apply_presence_frequency
from gptlab.inference.stops import StopSet
from gptlab.models import build_model
from gptlab.models.gpt2 import GPT2Config
from gptlab.models.llama import LlamaConfig

V = 61


def _tiny(family: str, **kw):
    """A random 2-layer model of `family` (Llama with grouped-query heads).

    Weights are drawn wider than the training init (std 0.3, not 0.02) so that
    greedy text depends on the context instead of repeating one token.
    """
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=V, context_length=64, emb_dim=32, n_layers=2, n_heads=2, **kw)
    else:
        cfg = LlamaConfig(vocab_size=V, context_length=64, emb_dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                          hidden_dim=64, **kw)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.3)
    return model


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    return _tiny(request.param)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _alone(model, request: Request) -> list[int]:
    engine = Engine(model, max_batch=1)
    h = engine.submit(request)
    list(engine.run())
    return h.tokens


def _full_logits(model, ids: list[int]) -> torch.Tensor:
    """The model's float logits at the last position, recomputed without a cache: (V,)."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].float()


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral"])
def test_slot_batch_logits_equal_unbatched(family):
    """Rows of one call at different positions and in any slots give each row's own logits."""
    m = _tiny("llama", sliding_window=4) if family == "mistral" else _tiny(family)
    cache = m.new_slot_cache(4, 32)
    prompts = {3: _prompt(7, 1), 0: _prompt(3, 2), 1: _prompt(11, 3)}
    with torch.no_grad():
        for slot, p in prompts.items():  # ragged prefill, one call each
            m.features(torch.tensor([p]), cache.rows(torch.tensor([slot]), torch.arange(len(p))[None]))
        nxt = {3: 5, 0: 9, 1: 17}
        slots = torch.tensor(list(prompts))
        positions = torch.tensor([[len(p)] for p in prompts.values()])  # (B, 1), each row its own
        h = m.features(torch.tensor([[nxt[s]] for s in prompts]), cache.rows(slots, positions))
        batched = m.get_head()(h[:, -1])
    for row, (slot, p) in enumerate(prompts.items()):
        torch.testing.assert_close(batched[row], _full_logits(m, p + [nxt[slot]]), atol=1e-5, rtol=1e-5)


def test_engine_greedy_equals_generate(model):
    p = _prompt(9, 4)
    ref = generate(model, torch.tensor(p), 12)[0, len(p):].tolist()
    assert _alone(model, Request(p, max_tokens=12)) == ref


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_tokens_identical_alone_and_in_a_changing_batch(model, sampled):
    """Others join, finish, are cancelled and wait for slots; long prompts prefill in chunks."""
    kw = dict(temperature=0.9, top_k=20, top_p=0.95, seed=7) if sampled else {}
    target = Request(_prompt(13, 5), max_tokens=20, **kw)
    others = [Request(_prompt(n, 10 + n), max_tokens=m, temperature=1.0, seed=n) for n, m in
              ((3, 4), (21, 9), (6, 15), (30, 6))]
    alone = _alone(model, target)
    engine = Engine(model, max_batch=3, prefill_chunk=5)
    early = engine.submit(others[0])
    h = engine.submit(target)
    cancelled = engine.submit(others[1])
    engine.step()
    engine.step()
    late = [engine.submit(r) for r in others[2:]]  # join mid-way (one waits for a free slot)
    for _ in range(4):
        engine.step()
    engine.cancel(cancelled)
    list(engine.run())
    assert h.tokens == alone and len(alone) == 20
    assert early.finish_reason == LENGTH and cancelled.finish_reason == CANCELLED
    assert all(r.finish_reason == LENGTH for r in late)
    for req, handle in zip(others[2:], late):  # the late ones also match their own solo runs
        assert handle.tokens == _alone(model, req)


def test_presence_frequency_equal_openai_formula():
    torch.manual_seed(0)
    logits, counts = torch.randn(2, 9), torch.tensor([[0, 1, 3, 0, 0, 0, 2, 0, 0]] * 2).float()
    got = apply_presence_frequency(logits, counts, presence=0.4, frequency=0.25)
    ref = logits.clone()
    for b in range(2):  # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
        for j in range(9):
            c = int(counts[b, j])
            ref[b, j] = logits[b, j] - c * 0.25 - (1.0 if c > 0 else 0.0) * 0.4
    torch.testing.assert_close(got, ref)


def test_engine_penalties_follow_the_reference_loop(model):
    p, pres, freq = _prompt(5, 6), 1.5, 0.8
    got = _alone(model, Request(p, max_tokens=15, presence_penalty=pres, frequency_penalty=freq))
    ids, counts = list(p), {}
    for _ in range(15):  # greedy over penalised full-recompute logits; counts are generated tokens only
        logits = _full_logits(model, ids)
        for j, c in counts.items():
            logits[j] -= c * freq + pres
        t = int(logits.argmax())
        counts[t] = counts.get(t, 0) + 1
        ids.append(t)
    assert got == ids[len(p):]
    assert got != _alone(model, Request(p, max_tokens=15))  # the penalties changed something


def test_logprobs_equal_log_softmax_of_the_logits(model):
    p = _prompt(8, 7)
    engine = Engine(model, max_batch=2)
    engine.submit(Request(_prompt(4, 8), max_tokens=10, temperature=1.0, seed=3))  # a batch neighbour
    h = engine.submit(Request(p, max_tokens=10, temperature=1.0, seed=1, logprobs=5))
    list(engine.run())
    ids = list(p)
    for ev in h.events:
        ref = torch.log_softmax(_full_logits(model, ids), -1)
        assert ev.logprob == pytest.approx(float(ref[ev.token_id]), abs=1e-5)
        top = torch.topk(ref, 5)
        assert [t for t, _ in ev.top_logprobs] == top.indices.tolist()
        assert [lp for _, lp in ev.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-5)
        ids.append(ev.token_id)


class _AngleTokenizer:
    """Token i reads "<i>"."""

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_stop_string_spanning_two_tokens_is_not_emitted(model):
    p = _prompt(6, 9)
    sampled = dict(temperature=1.0, seed=5)  # varied tokens (a tiny random model's greedy text repeats)
    free = _alone(model, Request(p, max_tokens=12, **sampled))
    k = next(i for i in range(11) if free[i] != free[i + 1])
    stop = f"{free[k]}><{free[k + 1]}"  # the end of token k's text and the start of token k+1's
    text = "".join(f"<{t}>" for t in free)
    at = text.find(stop)
    n = next(n for n in range(len(free)) if len("".join(f"<{t}>" for t in free[:n])) >= at + len(stop))
    engine = Engine(model, _AngleTokenizer(), max_batch=2)
    h = engine.submit(Request(p, max_tokens=12, stops=StopSet(strings=(stop,)), **sampled))
    list(engine.run())
    assert h.finish_reason == STOP and h.tokens == free[:n]  # stopped at the token that completed it
    assert h.text == text[:at] and stop not in h.text


def test_stop_token_ends_the_request(model):
    p = _prompt(6, 9)
    sampled = dict(temperature=1.0, seed=5)
    free = _alone(model, Request(p, max_tokens=8, **sampled))
    stop = next(t for t in free if t != free[0])  # a token that first appears after the start
    at = free.index(stop)
    engine = Engine(model, _AngleTokenizer())
    h = engine.submit(Request(p, max_tokens=8, stops=StopSet(frozenset({stop})), **sampled))
    list(engine.run())
    assert h.finish_reason == STOP and h.tokens == free[:at + 1]
    assert h.text == "".join(f"<{t}>" for t in free[:at])  # the stop token adds no text


def test_cancel_frees_the_slot_for_a_waiting_request(model):
    engine = Engine(model, max_batch=2)
    a = engine.submit(Request(_prompt(4, 1), max_tokens=30))
    b = engine.submit(Request(_prompt(5, 2), max_tokens=30))
    c = engine.submit(Request(_prompt(6, 3), max_tokens=3))
    engine.step()
    assert {a.slot, b.slot} == {0, 1} and c.slot is None and not engine.free  # full: c waits
    slot = a.slot
    engine.cancel(a)
    assert a.slot is None and engine.free == [slot] and a.finish_reason == CANCELLED  # freed at once
    events = engine.step()
    assert (a, a.events[-1]) in events and c.slot == slot  # c was admitted into a's slot
    list(engine.run())
    assert c.tokens == _alone(model, c.request) and b.finish_reason == LENGTH


def test_chunked_prefill_keeps_decoding_going(model):
    engine = Engine(model, max_batch=2, prefill_chunk=4)
    short = engine.submit(Request(_prompt(2, 1), max_tokens=20))
    engine.step()
    long = engine.submit(Request(_prompt(40, 2), max_tokens=2))
    for _ in range(10):  # 40 prompt tokens take 10 steps; the short request gets a token in each
        n = len(short.tokens)
        engine.step()
        assert len(short.tokens) == n + 1
    assert len(long.tokens) >= 1
    list(engine.run())
    assert long.tokens == _alone(model, long.request)


@pytest.mark.parametrize("kw, msg", [
    (dict(logprobs=21), "logprobs"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(temperature=-1.0), "temperature"), (dict(prompt=[]), "empty"), (dict(prompt=[V]), "vocabulary"),
    (dict(prompt=list(range(40)) * 2), "raise max_len"), (dict(stops=StopSet(strings=("x",))), "tokenizer"),
])
def test_bad_requests_are_refused(model, kw, msg):
    req = Request(**{"prompt": [1, 2], **kw})
    with pytest.raises(GptlabError, match=msg):
        Engine(model).submit(req)


def test_max_len_caps_the_length(model):
    engine = Engine(model, max_len=10)
    h = engine.submit(Request(_prompt(7, 1), max_tokens=50))
    list(engine.run())
    assert len(h.tokens) == 3 and h.finish_reason == LENGTH


# ---- prefix reuse, the rolling window, the prompt's logprobs, min_tokens ----

@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral"])
def test_shared_prefixes_give_the_tokens_of_a_fresh_run(family, reuse):
    """Requests sharing a system prompt (and a chat's earlier turn) skip it with reuse, same tokens either way."""
    m = _tiny("llama", sliding_window=6) if family == "mistral" else _tiny(family)
    system = _prompt(9, 40)
    first = Request(system + _prompt(4, 41), max_tokens=6, temperature=0.8, seed=3)
    engine = Engine(m, max_batch=2, prefix_reuse=reuse)
    h1 = engine.submit(first)
    list(engine.run())
    turn2 = Request(system + _prompt(4, 41) + h1.tokens + _prompt(3, 42), max_tokens=7)  # the next turn
    other = Request(system + _prompt(5, 43), max_tokens=5, temperature=1.1, seed=4)  # same system prompt
    h2, h3 = engine.submit(turn2), engine.submit(other)
    list(engine.run())
    assert h1.cached_tokens == 0
    if reuse and family != "mistral":
        assert h2.cached_tokens == len(first.prompt) + len(h1.tokens) - 1  # all but the last generated id
    if reuse and family == "mistral":  # the ring of 6 wrapped: nothing reusable from position 0
        assert h2.cached_tokens == 0
    if not reuse:
        assert h2.cached_tokens == h3.cached_tokens == 0
    for req, h in ((turn2, h2), (other, h3)):
        assert h.tokens == _alone(m, req)


def test_prefix_reuse_picks_the_slot_with_the_longest_common_prefix(model):
    engine = Engine(model, max_batch=3)
    a, b = _prompt(12, 50), _prompt(12, 51)
    for p in (a, b):
        engine.submit(Request(p, max_tokens=2))
    list(engine.run())
    h = engine.submit(Request(b[:10] + [1, 2], max_tokens=3))
    engine.step()
    assert h.cached_tokens == 10 and h.slot == 1  # b ran in slot 1


def test_rolling_window_cache_equals_full_attention_with_the_window_mask():
    """Mistral's window W=5 over 40 tokens: the cache holds only W per slot, logits equal full recomputation."""
    m = _tiny("llama", sliding_window=5)
    engine = Engine(m, max_batch=2, max_len=48, prefill_chunk=4)  # chunks of 4 < W, prompt of 9 > W
    assert engine.cache.ring == 5 and engine.cache.k[0].shape[2] == 5
    prompt = _prompt(9, 60)
    h = engine.submit(Request(prompt, max_tokens=30, logprobs=3))
    other = engine.submit(Request(_prompt(3, 61), max_tokens=12, temperature=1.0, seed=1))
    list(engine.run())
    assert other.finish_reason == LENGTH and len(h.tokens) == 30
    ids = prompt + h.tokens
    with torch.no_grad():
        full = torch.log_softmax(m(torch.tensor([ids]))[0].float(), -1)  # (T, V) with the window mask
    for i, event in enumerate(h.events):
        at = len(prompt) - 1 + i
        assert event.token_id == int(full[at].argmax())
        assert abs(event.logprob - float(full[at, event.token_id])) < 1e-4


def test_prompt_logprobs_equal_log_softmax_of_the_full_pass(model):
    """OpenAI's echo: each prompt token's logprob given the ones before it, chunked or not, with no new tokens."""
    prompt = _prompt(11, 70)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt]))[0].float(), -1)  # (T, V)
    for chunk, max_tokens in ((256, 3), (4, 0)):
        engine = Engine(model, max_batch=2, prefill_chunk=chunk)
        h = engine.submit(Request(prompt, max_tokens=max_tokens, prompt_logprobs=2))
        list(engine.run())
        assert len(h.prompt_logprobs) == len(prompt) and h.prompt_logprobs[0] == (None, ())
        for i, (lp, top) in enumerate(h.prompt_logprobs[1:], start=1):
            assert abs(lp - float(full[i - 1, prompt[i]])) < 1e-5
            assert top[0][0] == int(full[i - 1].argmax()) and len(top) == 2
        assert len(h.tokens) == max_tokens and h.finish_reason == LENGTH


def test_min_tokens_holds_back_the_stop_token(model):
    first = _alone(model, Request(_prompt(5, 80), max_tokens=1))[0]
    engine = Engine(model, max_batch=1)
    h = engine.submit(Request(_prompt(5, 80), max_tokens=6, min_tokens=3, stops=StopSet(frozenset({first}))))
    list(engine.run())
    assert h.tokens[0] != first and len(h.tokens) >= 3

