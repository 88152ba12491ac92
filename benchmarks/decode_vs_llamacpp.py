"""Decoding speed of the engine vs llama.cpp on one GGUF file (SmolLM2-135M-Instruct Q4_1).

One run, the same file, the same thread count, the same prompt, greedy, a
fixed number of new tokens (no early stop); engines are timed in turns
(A B C A B C ...) keeping each one's best, so that a change in the machine's
load does not favour whoever ran at a quiet moment. Rows:

- batch 1 tokens/s: gptlab int4 and int8 (the engine, as ``gptlab generate
  --quantize``), transformers fp32 (the same weights as a dense checkpoint),
  llama.cpp (``llama-cpp-python``; ``make llamacpp`` installs it; the row is
  skipped with a message when it is absent);
- gptlab's fraction of the memory-bandwidth limit: bandwidth measured in the
  same run (a large copy) divided by the bytes of weights one token reads;
- aggregate tokens/s of 8 concurrent sequences, and the ratio to the same
  engine's batch 1: gptlab's engine (8 requests), and llama.cpp through
  llama-cpp-python's low-level API (``llama_batch`` with 8 sequence ids in one
  context: one ``llama_decode`` for the 8 prompts, then one per step for the
  8 new tokens; its high-level ``Llama`` decodes one sequence at a time);
- every tokens/s figure twice: with the prompt pass included (the whole
  request), and of the decode steps alone (from the step at which every
  sequence has its first token to the end), since at 8 sequences the 8
  prompt passes are a fixed cost that batching the decode cannot shrink;
- time to first token of a 512-token prompt, gptlab and llama.cpp.

Not a test: the figures depend on the machine and on whatever else runs on it
(the load average is printed with them).

    .venv/bin/python benchmarks/decode_vs_llamacpp.py [--new-tokens 64] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import llama_cpp_missing  # noqa: E402
from generate_speed import PROMPT_MESSAGES, find_model  # noqa: E402


def memory_bandwidth() -> float:
    """Bytes/s of a large tensor copy (read + write), best of 5."""
    src = torch.empty(64 * 2**20, dtype=torch.float32).fill_(1.0)  # 256 MiB
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decoded token reads: every parameter and buffer but the embedding table."""
    emb = model.get_embedding().weight
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                if t is not emb)
    return total + model.cfg.emb_dim * emb.element_size()  # one embedding row


def gptlab_runner(model, prompt: list[int], n: int, batch: int = 1):
    """A run of ``batch`` requests for ``n`` greedy tokens: (first request's tokens, seconds of decode steps)."""
    from gptlab.inference.engine import Engine, Request

    def go():
        engine = Engine(model, max_batch=batch, max_len=len(prompt) + n + 1, prefix_reuse=False)
        handles = [engine.submit(Request(prompt, max_tokens=n)) for _ in range(batch)]
        t_first = None
        while engine.busy:
            engine.step()
            if t_first is None and all(h.tokens for h in handles):
                t_first = time.perf_counter()
        return handles[0].tokens, time.perf_counter() - t_first
    return go


@torch.no_grad()
def top1_along(model, prompt: list[int], text: list[int]) -> int:
    """How many of ``text``'s tokens are ``model``'s greedy choice given the prompt and the text before each."""
    logits = model(torch.tensor([prompt + text[:-1]]))[0, len(prompt) - 1:]  # position i predicts text[i]
    return int((logits.argmax(-1) == torch.tensor(text)).sum())


def gptlab_ttft(model, prompt: list[int]) -> float:
    from gptlab.inference.engine import Engine, Request

    engine = Engine(model, max_batch=1, max_len=len(prompt) + 2, prefill_chunk=len(prompt), prefix_reuse=False)
    h = engine.submit(Request(prompt, max_tokens=1))
    t0 = time.perf_counter()
    while not h.tokens:
        engine.step()
    return time.perf_counter() - t0


def llama_cpp_runners(path: Path, prompt: list[int], long_prompt: list[int], n: int, threads: int):
    from llama_cpp import Llama as LlamaCpp

    llm = LlamaCpp(model_path=str(path), n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)

    def go():
        llm.reset()
        got, t_first = [], None
        for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            got.append(t)
            t_first = t_first or time.perf_counter()
            if len(got) >= n:
                break
        return got, time.perf_counter() - t_first

    def ttft():
        llm.reset()
        t0 = time.perf_counter()
        next(iter(llm.generate(long_prompt, temp=0.0, top_k=1, reset=True)))
        return time.perf_counter() - t0
    return go, ttft


def llama_cpp_batched_runner(path: Path, prompt: list[int], n: int, threads: int, batch: int):
    """llama.cpp decoding ``batch`` sequences together through llama-cpp-python's low-level API.

    One context with ``n_seq_max = batch``; one ``llama_decode`` holds every prompt (each token tagged
    with its sequence id, logits at each prompt's last position), then each step one ``llama_decode``
    of the ``batch`` new tokens at their positions; greedy is the argmax of each row's logits.
    """
    import llama_cpp.llama_cpp as C
    import numpy as np

    C.llama_backend_init()
    model = C.llama_model_load_from_file(str(path).encode(), C.llama_model_default_params())
    per_seq = 64 * -(-(len(prompt) + n + 1) // 64)
    cp = C.llama_context_default_params()
    cp.n_ctx, cp.n_seq_max = per_seq * batch, batch
    cp.n_batch = cp.n_ubatch = max(512, batch * len(prompt))
    cp.n_threads = cp.n_threads_batch = threads
    ctx = C.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama.cpp could not make a context with 8 sequences")
    vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(model))
    lb = C.llama_batch_init(cp.n_batch, 0, 1)

    def decode(entries):  # (token, position, sequence, wants logits)
        lb.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            lb.token[i], lb.pos[i], lb.n_seq_id[i], lb.logits[i] = tok, pos, 1, logits
            lb.seq_id[i][0] = seq
        if C.llama_decode(ctx, lb) != 0:
            raise SystemExit("llama_decode failed in the batched llama.cpp run")

    def argmax(i: int) -> int:
        return int(np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, i), shape=(vocab,)).argmax())

    def go():
        C.llama_memory_clear(C.llama_get_memory(ctx), True)
        P = len(prompt)
        decode([(t, p, s, p == P - 1) for s in range(batch) for p, t in enumerate(prompt)])
        nxt = [argmax(s * P + P - 1) for s in range(batch)]
        got, t_first = [nxt[0]], time.perf_counter()
        for step in range(n - 1):
            decode([(nxt[s], P + step, s, True) for s in range(batch)])
            nxt = [argmax(s) for s in range(batch)]
            got.append(nxt[0])
        return got, time.perf_counter() - t_first
    return go


def timed_in_turns(engines: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Each engine's best whole-run seconds and best decode-steps seconds, timed in turns; its tokens."""
    tokens = {name: go()[0] for name, go in engines.items()}  # warm-up
    best = {name: float("inf") for name in engines}
    best_decode = dict(best)
    for _ in range(repeats):
        for name, go in engines.items():
            t0 = time.perf_counter()
            _, decode = go()
            best[name] = min(best[name], time.perf_counter() - t0)
            best_decode[name] = min(best_decode[name], decode)
    return best, best_decode, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, path = args.new_tokens, find_model()

    from gptlab.inference.quantize import quantize_int4, quantize_int8
    from gptlab.tokenizers import load_tokenizer
    from gptlab.tokenizers.chat_template import ChatTemplate
    from gptlab.weights.gguf import load_gguf

    tok = load_tokenizer(str(path))
    prompt = tok.encode(ChatTemplate.for_tokenizer(tok).render(PROMPT_MESSAGES, add_generation_prompt=True))
    long_prompt = (tok.encode(" ".join(["The quick brown fox jumps over the lazy dog."] * 60)))[:512]
    print(f"model {path.name}; prompt {len(prompt)} tokens; {n} new tokens greedy; {args.threads} threads; "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    int4, int8 = quantize_int4(load_gguf(path)), quantize_int8(load_gguf(path))
    engines = {"gptlab int4": gptlab_runner(int4, prompt, n), "gptlab int8": gptlab_runner(int8, prompt, n)}
    if not args.skip_transformers:
        import transformers

        from gptlab.weights.export import export_hf

        transformers.logging.set_verbosity_error()
        tmp = Path(tempfile.mkdtemp()) / "hf"
        export_hf(load_gguf(path), tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ids = torch.tensor([prompt])

        class FirstToken:  # transformers' streamer protocol: put() gets the prompt, then each new token
            def __init__(self):
                self.calls, self.t = 0, None

            def put(self, value):
                self.calls += 1
                if self.calls == 2:
                    self.t = time.perf_counter()

            def end(self):
                pass

        def hf_go():
            first = FirstToken()
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=tok.pad_id, streamer=first)
            return out[0, len(prompt):].tolist(), time.perf_counter() - first.t
        engines["transformers fp32"] = hf_go
    llama_ttft = None
    missing = llama_cpp_missing()
    if missing is None:
        engines["llama.cpp"], llama_ttft = llama_cpp_runners(path, prompt, long_prompt, n, args.threads)
    else:
        print(f"  llama.cpp: {missing}; its rows are skipped")
    B = 8
    engines[f"gptlab int4 x{B}"] = gptlab_runner(int4, prompt, n, batch=B)
    if missing is None:
        engines[f"llama.cpp x{B}"] = llama_cpp_batched_runner(path, prompt, n, args.threads, B)

    best, best_decode, tokens = timed_in_turns(engines, args.repeats)
    rows = {name: (B if name.endswith(f"x{B}") else 1) for name in engines}
    tps = {name: rows[name] * n / secs for name, secs in best.items()}
    dps = {name: rows[name] * (n - 1) / secs for name, secs in best_decode.items()}
    ref, dref = tps.get("llama.cpp"), dps.get("llama.cpp")
    print("batch 1, tokens/s    whole request (prompt pass included)    decode steps only")
    for name in engines:
        if rows[name] == 1:
            vs = (f" {tps[name] / ref:5.2f}x llama.cpp", f" {dps[name] / dref:5.2f}x llama.cpp") if ref else ("", "")
            print(f"  {name:20s} {tps[name]:7.1f}{vs[0]:17s}          {dps[name]:7.1f}{vs[1]}")
    if "llama.cpp" in tokens and tokens["llama.cpp"] != tokens["gptlab int4"]:
        same = next((i for i, (a, b) in enumerate(zip(tokens["llama.cpp"], tokens["gptlab int4"])) if a != b), n)
        print(f"  (gptlab int4 and llama.cpp agree on the first {same} of {n} greedy tokens: different rounding;")
        # a prefix ends at the first near-tie; along llama.cpp's own text each model's next-token choice says more
        hits = [top1_along(model, prompt, tokens["llama.cpp"]) for model in (int4, int8)]
        print(f"   along llama.cpp's own {n} tokens, gptlab's greedy choice is llama.cpp's at {hits[0]} (int4) "
              f"and {hits[1]} (int8) of {n})")
    bw = memory_bandwidth()
    limit = bw / weight_bytes(int4)
    print(f"memory bandwidth {bw / 1e9:.1f} GB/s over {weight_bytes(int4) / 1e6:.1f} MB of int4 weights per token: "
          f"limit {limit:.0f} tokens/s; gptlab int4 decode at {dps['gptlab int4'] / limit:.0%} of it")
    print(f"{B} concurrent sequences, aggregate tokens/s (and x the same engine's batch 1):")
    for name, one in ((f"gptlab int4 x{B}", "gptlab int4"), (f"llama.cpp x{B}", "llama.cpp")):
        if name in tps:
            print(f"  {name:20s} whole request {tps[name]:7.1f} ({tps[name] / tps[one]:4.2f}x)   "
                  f"decode steps only {dps[name]:7.1f} ({dps[name] / dps[one]:4.2f}x)")
    if f"llama.cpp x{B}" in tps:
        a, b = f"gptlab int4 x{B}", f"llama.cpp x{B}"
        print(f"  gptlab / llama.cpp at {B} sequences: whole request {tps[a] / tps[b]:.2f}x, "
              f"decode steps {dps[a] / dps[b]:.2f}x")
    ours = min(gptlab_ttft(int4, long_prompt) for _ in range(args.repeats))
    line = f"time to first token, {len(long_prompt)}-token prompt: gptlab int4 {ours * 1e3:.0f} ms"
    if llama_ttft is not None:
        theirs = min(llama_ttft() for _ in range(args.repeats))
        line += f", llama.cpp {theirs * 1e3:.0f} ms ({ours / theirs:.2f}x)"
    print(line)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
