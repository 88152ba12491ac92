"""Chapter 7 as a learner runs it: Alpaca prompts, padded and masked batches, an LLM judge."""

from __future__ import annotations

from paths import SHARED  # noqa: E402

import json
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from gptlab.book import (GPTModel, InstructionDataset, calc_loss_batch, custom_collate_fn, format_input,
                         generate_model_scores, query_model)
from gptlab.errors import GptlabError


@pytest.fixture(scope="module")
def instruction_data():
    from pathlib import Path

    path = Path(SHARED + "/instruction-data.json")
    if not path.exists():
        pytest.skip("instruction-data.json not available")
    return json.loads(path.read_text(encoding="utf-8"))


def test_alpaca_prompt_and_the_course_split(instruction_data):
    assert len(instruction_data) == 1100
    entry = instruction_data[50]
    assert format_input(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nIdentify the correct spelling of the following word."
        "\n\n### Input:\nOcassion")
    assert entry["output"] == "The correct spelling is 'Occasion.'"
    no_input = instruction_data[999]
    assert no_input["input"] == "" and "### Input" not in format_input(no_input)
    train_portion = int(len(instruction_data) * 0.85)
    test_portion = int(len(instruction_data) * 0.1)
    assert (train_portion, test_portion, len(instruction_data) - train_portion - test_portion) == (935, 110, 55)
    with pytest.raises(GptlabError, match="keys 'instruction', 'input' and 'output'"):
        format_input({"prompt": "hi"})


def test_collate_pads_and_masks_like_the_course():
    inputs_1, inputs_2, inputs_3 = [0, 1, 2, 3, 4], [5, 6], [7, 8, 9]
    inputs, targets = custom_collate_fn((inputs_1, inputs_2, inputs_3))
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    inputs, targets = custom_collate_fn((inputs_1, inputs_2, inputs_3), allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, 50256], [7, 8, 9]]
    assert targets.tolist() == [[1, 2, 3], [6, 50256, -100], [8, 9, 50256]]
    inputs, targets = custom_collate_fn(([1, 2], [3]), pad_token_id=0, ignore_index=-1)
    assert inputs.tolist() == [[1, 2], [3, 0]] and targets.tolist() == [[2, 0], [0, -1]]
    with pytest.raises(GptlabError, match="empty batch"):
        custom_collate_fn([])


def test_masked_positions_do_not_count_in_the_loss():
    # The course's example: -100 targets are skipped by cross_entropy.
    logits = torch.tensor([[-1.0, 1.0], [-0.5, 1.5], [-0.5, 1.5]])
    loss_two = F.cross_entropy(logits[:2], torch.tensor([0, 1]))
    assert F.cross_entropy(logits, torch.tensor([0, 1, -100])) == loss_two
    assert f"{loss_two.item():.4f}" == "1.1269"


def test_instruction_dataset_and_a_training_step(instruction_data, tokenizer, tiny_cfg):
    data = instruction_data[:8]
    dataset = InstructionDataset(data, tokenizer)
    assert len(dataset) == 8
    assert tokenizer.decode(dataset[2]) == format_input(data[2]) + "\n\n### Response:\n" + data[2]["output"]
    collate = partial(custom_collate_fn, device="cpu", allowed_max_length=64)
    torch.manual_seed(123)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate, shuffle=True, drop_last=True)
    x, y = next(iter(loader))
    assert x.shape == y.shape and x.shape[0] == 4 and x.shape[1] <= 64
    torch.manual_seed(123)
    model = GPTModel(dict(tiny_cfg, context_length=64))
    model.eval()
    with torch.no_grad():
        loss = calc_loss_batch(x, y, model, "cpu")
        logits = model(x)
    keep = y != -100
    manual = F.cross_entropy(logits[keep], y[keep])
    assert torch.allclose(loss, manual, atol=1e-6)
    with pytest.raises(GptlabError, match="lacks 'output'"):
        InstructionDataset([{"instruction": "a", "input": ""}], tokenizer)


class _FakeOllama(BaseHTTPRequestHandler):
    """Answers /api/chat like Ollama: newline-delimited JSON chunks of the reply."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.path != "/api/chat":
            self.send_error(404)
            return
        prompt = body["messages"][0]["content"]
        reply = self.server.reply(prompt)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        for i in range(0, len(reply), 2):  # stream in 2-character pieces
            self.wfile.write((json.dumps({"message": {"role": "assistant", "content": reply[i:i + 2]},
                                          "done": False}) + "\n").encode())
        self.wfile.write((json.dumps({"message": {"role": "assistant", "content": ""}, "done": True}) + "\n").encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def ollama():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOllama)
    server.requests = []
    server.reply = lambda prompt: "Hello from the judge"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_query_model_talks_to_an_ollama_endpoint(ollama):
    url = f"http://127.0.0.1:{ollama.server_port}/api/chat"
    assert query_model("What do Llamas eat?", model="llama3", url=url) == "Hello from the judge"
    sent = ollama.requests[0]
    assert sent["model"] == "llama3"
    assert sent["messages"] == [{"role": "user", "content": "What do Llamas eat?"}]
    assert sent["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    with pytest.raises(GptlabError, match="HTTP 404"):
        query_model("hi", url=f"http://127.0.0.1:{ollama.server_port}/api/wrong")


def test_generate_model_scores(ollama, capsys):
    ollama.reply = lambda prompt: "85" if "`Paris`" in prompt else "I would say 40"
    url = f"http://127.0.0.1:{ollama.server_port}/api/chat"
    data = [
        {"instruction": "Name the capital of France.", "input": "", "output": "Paris.", "model_response": "Paris"},
        {"instruction": "Name the capital of Italy.", "input": "", "output": "Rome.", "model_response": "Milan"},
    ]
    assert generate_model_scores(data, "model_response", model="llama3", url=url) == [85]
    assert "Could not convert score: I would say 40" in capsys.readouterr().out
    prompt = ollama.requests[0]["messages"][0]["content"]
    assert prompt.startswith("Given the input `Below is an instruction")
    assert "and correct output `Paris.`, score the model response `Paris` on a scale from 0 to 100" in prompt
    assert prompt.endswith("Respond with the integer number only.")
    with pytest.raises(GptlabError, match="lacks the key 'response'"):
        generate_model_scores(data, "response", url=url)


def test_unreachable_server_is_explained():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(GptlabError, match="cannot reach an Ollama server.*ollama serve"):
        query_model("hi", url=f"http://127.0.0.1:{port}/api/chat")
