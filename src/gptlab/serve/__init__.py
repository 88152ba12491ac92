"""``gptlab serve``: HTTP only. The OpenAI and Ollama APIs and the playground page, over the engine.

    commands.py     serve_command: `gptlab serve MODEL ...` (uvicorn; SIGTERM exits 0)
    app.py          build_app: routes, /health, /metrics, /playground, error handlers, key, CORS
    openai_api.py   /v1/chat/completions, /v1/models, /tokenize, /detokenize
    completions.py  /v1/completions (echo + logprobs, for lm-evaluation-harness)
    ollama_api.py   /api/chat, /api/generate (NDJSON), /api/tags, /api/show, /api/version, GET /
    params.py       client JSON -> engine Requests (typed fields, messages, stops, the context limit)
    grammar.py      JSON output by grammar-constrained decoding (llguidance)
    common.py       starting a generation, collecting it, cancelling it when the client leaves
    worker.py       the one thread that owns the engine; handlers reach it through commands
    model.py        ServedModel: the opened model, its names, template, stops, engine and worker
    http.py         ApiError and each API's error shape, capped JSON bodies, the API key check
    metrics.py      Prometheus counters and gauges

Nothing imports this package except ``gptlab.cli``; the engine does the work.
"""
