"""A gptlab server on 127.0.0.1 at a free port, in a thread of the test process (started and stopped by tests)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import torch
import uvicorn

from gptlab.inference.open import open_model
from gptlab.models import build_model
from gptlab.models.llama import LlamaConfig
from gptlab.serve.app import build_app
from gptlab.serve.model import ServedModel
from gptlab.tokenizers import train_bpe
from gptlab.weights.native import save_model_dir

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("What is the capital of France? Paris is the capital of France. Hello there, how are you? "
        "I am fine, thank you. The quick brown fox jumps over the lazy dog. Score the response from 0 to 100. "
        "Respond with the integer number only. 0 1 2 3 4 5 6 7 8 9 {\"answer\": \"yes\"} ") * 20


def tiny_model_dir(path, context: int = 512):
    """A random 2-layer Llama with a ChatML BPE tokenizer, saved as a gptlab model directory.

    Weights are drawn wider than the training init (std 0.3) so that greedy text
    depends on the prompt instead of repeating one token.
    """
    tok = train_bpe(TEXT, vocab_size=400, special_tokens=SPECIALS, min_frequency=2)
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, context_length=context, emb_dim=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, hidden_dim=64)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.3)
    return save_model_dir(model, path, tok)


def free_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


class LiveServer:
    """``with LiveServer(app) as url:`` serves ``app`` until the block ends (waits for /health 200 if ``ready``)."""

    def __init__(self, app, ready: bool = True):
        self.app, self.ready = app, ready
        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                       daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.server.started:
                if not self.ready or httpx.get(self.url + "/health").status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError("the test server did not start within 60 s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    @property
    def served(self) -> ServedModel:
        return self.app.state.served


def served_app(model_dir, name: str = "tiny", max_batch: int = 8, max_queue: int = 64, context: int | None = None,
               **app_kw):
    """The app serving ``model_dir`` (opened on CPU, fp32)."""
    def load():
        return ServedModel.build(open_model(str(model_dir), device="cpu"), name, max_batch=max_batch,
                                 max_queue=max_queue, context=context)

    return build_app(load, **app_kw)
