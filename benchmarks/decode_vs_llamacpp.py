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
- aggregate tokens/s of 8 concurrent sequences on the engine, and its ratio
  to gptlab's batch 1 (llama-cpp-python's high-level API decodes one sequence
  at a time, so llama.cpp has no batched row here);
- time to first token of a 512-token prompt, gptlab and llama.cpp.

Not a test: the figures depend on the machine and on whatever else runs on it
(the load average is printed with them).

    .venv/bin/python benchmarks/decode_vs_llamacpp.py [--new-tokens 64] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
    from gptlab.inference.engine import Engine, Request

    def go():
        engine = Engine(model, max_batch=batch, max_len=len(prompt) + n + 1, prefix_reuse=False)
        handles = [engine.submit(Request(prompt, max_tokens=n)) for _ in range(batch)]
        list(engine.run())
        return handles[0].tokens
    return go


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
        got = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            got.append(t)
            if len(got) >= n:
                break
        return got

    def ttft():
        llm.reset()
        t0 = time.perf_counter()
        next(iter(llm.generate(long_prompt, temp=0.0, top_k=1, reset=True)))
        return time.perf_counter() - t0
    return go, ttft


def timed_in_turns(engines: dict, repeats: int) -> dict:
    for go in engines.values():
        go()  # warm-up
    best = {name: float("inf") for name in engines}
    for _ in range(repeats):
        for name, go in engines.items():
            t0 = time.perf_counter()
            go()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


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

        def hf_go():
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=tok.pad_id)
            return out[0, len(prompt):].tolist()
        engines["transformers fp32"] = hf_go
    llama_ttft = None
    if importlib.util.find_spec("llama_cpp") is not None:
        engines["llama.cpp"], llama_ttft = llama_cpp_runners(path, prompt, long_prompt, n, args.threads)
    else:
        print("  llama.cpp: llama-cpp-python is not installed (make llamacpp); its rows are skipped")
    engines["gptlab int4 x8 sequences"] = gptlab_runner(int4, prompt, n, batch=8)

    best = timed_in_turns(engines, args.repeats)
    tps = {name: (8 if "x8" in name else 1) * n / secs for name, secs in best.items()}
    ref = tps.get("llama.cpp")
    print("batch 1 (tokens/s; prompt pass included):")
    for name, v in tps.items():
        if "x8" not in name:
            print(f"  {name:22s} {v:7.1f}" + (f"   {v / ref:5.2f}x llama.cpp" if ref else ""))
    bw = memory_bandwidth()
    limit = bw / weight_bytes(int4)
    print(f"memory bandwidth {bw / 1e9:.1f} GB/s over {weight_bytes(int4) / 1e6:.1f} MB of int4 weights per token: "
          f"limit {limit:.0f} tokens/s; gptlab int4 at {tps['gptlab int4'] / limit:.0%} of it")
    agg = tps["gptlab int4 x8 sequences"]
    print(f"8 concurrent sequences (engine, int4): {agg:.1f} tokens/s aggregate = "
          f"{agg / tps['gptlab int4']:.2f}x gptlab's batch 1 (llama.cpp: no batched API in llama-cpp-python)")
    ours = min(gptlab_ttft(int4, long_prompt) for _ in range(args.repeats))
    line = f"time to first token, {len(long_prompt)}-token prompt: gptlab int4 {ours * 1e3:.0f} ms"
    if llama_ttft is not None:
        theirs = min(llama_ttft() for _ in range(args.repeats))
        line += f", llama.cpp {theirs * 1e3:.0f} ms ({ours / theirs:.2f}x)"
    print(line)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
