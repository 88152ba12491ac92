"""``gptlab eval``: loss and perplexity of a model on a corpus."""

from __future__ import annotations

import json

from gptlab.evaluation.perplexity import perplexity


def eval_command(model: str, data: str | None = None, max_length: int | None = None, stride: int | None = None,
                 batch_size: int = 8, max_tokens: int | None = None, device: str = "auto",
                 dtype: str | None = None, as_json: bool = False) -> int:
    """Loss and perplexity of a model on a corpus (every token scored once).

    Args:
        model: a gptlab run or model directory, Hugging Face directory, .gguf file or pkg: ref.
        data: text file, directory of .txt, .jsonl, or a named corpus; default: the built-in corpus.
        max_length: window length (default: the model's context length).
        stride: window step; smaller than max_length gives each token more left context.
        batch_size: windows per forward pass.
        max_tokens: score only the first N tokens of the corpus.
        device: auto, cpu, cuda or mps.
        dtype: weights dtype (fp32, bf16, fp16); default: bf16 on CUDA GPUs that support it, else fp32.
        as_json: print JSON.
    """
    from gptlab.data import load_corpus
    from gptlab.errors import GptlabError
    from gptlab.inference import open_model

    for name, value in (("max-tokens", max_tokens), ("max-length", max_length), ("stride", stride),
                        ("batch-size", batch_size)):
        if value is not None and value < 1:
            raise GptlabError(f"--{name} {value} must be at least 1")
    opened = open_model(model, device=device, dtype=dtype)
    net, tok = opened.model, opened.tokenizer
    ids = tok.encode(load_corpus(data), allowed_special="all")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    r = perplexity(net, ids, max_length, stride, batch_size)
    if as_json:
        print(json.dumps(r))
    else:
        print(f"tokens scored: {r['tokens']:,}\nloss: {r['loss']:.4f}\nperplexity: {r['perplexity']:.2f}")
    return 0
