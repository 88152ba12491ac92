"""Chapter 7 of the course: instruction fine-tuning and LLM-judge evaluation.

The Alpaca prompt, the dataset of tokenized prompt+response texts, the collate
function that pads a batch and masks padding in the targets, and the two
helpers that ask a local Ollama server (``/api/chat``) to score responses.

Full strength: ``gptlab finetune instruct`` (``gptlab.finetune``) for training
and ``gptlab judge`` (``gptlab.evaluation.judge``) for scoring.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import torch
from torch.utils.data import Dataset

from gptlab.errors import GptlabError


def format_input(entry: dict) -> str:
    """The Alpaca-style prompt of an ``{"instruction", "input", "output"}`` entry (without the response).

    The ``### Input:`` section is left out when ``entry["input"]`` is empty.
    Full strength: ``gptlab finetune instruct`` (Alpaca and chat-template prompts).
    """
    try:
        instruction_text = (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
            f"\n\n### Instruction:\n{entry['instruction']}"
        )
        input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    except (KeyError, TypeError, AttributeError):
        raise GptlabError("an instruction entry must be a dict with the keys 'instruction', 'input' and 'output'") from None
    return instruction_text + input_text


class InstructionDataset(Dataset):
    """Token ids of ``format_input(entry) + "\\n\\n### Response:\\n" + output`` for each entry.

    Full strength: ``gptlab finetune instruct``.
    """

    def __init__(self, data: list[dict], tokenizer):
        self.data = data
        self.encoded_texts = []
        for entry in data:
            if "output" not in entry:
                raise GptlabError("an instruction entry lacks 'output'; entries need instruction, input and output")
            full_text = format_input(entry) + f"\n\n### Response:\n{entry['output']}"
            self.encoded_texts.append(tokenizer.encode(full_text))

    def __getitem__(self, index: int) -> list[int]:
        return self.encoded_texts[index]

    def __len__(self) -> int:
        return len(self.data)


def custom_collate_fn(batch: list[list[int]], pad_token_id: int = 50256, ignore_index: int = -100,
                      allowed_max_length: int | None = None, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch of id lists into ``(inputs, targets)``, both (b, L).

    Each sequence gets one ``pad_token_id`` (the end-of-text token the model
    should learn to emit), is padded to the longest length + 1, then
    inputs = all but the last id, targets = all but the first. In the targets,
    every padding id after the first is replaced by ``ignore_index`` so the loss
    skips it. ``allowed_max_length`` truncates both.
    Full strength: ``gptlab finetune instruct`` (also masks the prompt tokens on request).
    """
    if not batch:
        raise GptlabError("custom_collate_fn got an empty batch")
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = list(item) + [pad_token_id]  # one end-of-text token
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])  # (L,)
        targets = torch.tensor(padded[1:])  # (L,) shifted by one
        indices = torch.nonzero(targets == pad_token_id).squeeze(-1)
        if indices.numel() > 1:  # keep the first pad as a target, ignore the rest
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs, targets = inputs[:allowed_max_length], targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)


def query_model(prompt: str, model: str = "llama3", url: str = "http://localhost:11434/api/chat") -> str:
    """Send ``prompt`` to an Ollama-compatible ``/api/chat`` endpoint and return the reply text.

    Deterministic options as in the course (seed 123, temperature 0, num_ctx
    2048); the streamed JSON lines are joined. Full strength: ``gptlab judge``.
    """
    data = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
    }
    request = urllib.request.Request(url, data=json.dumps(data).encode("utf-8"), method="POST")
    request.add_header("Content-Type", "application/json")
    response_data = ""
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            for raw in response:  # one JSON object per line
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                msg = json.loads(line)
                if "error" in msg:
                    raise GptlabError(f"the server at {url} answered: {msg['error']} (is model {model!r} pulled? "
                                      f"run `ollama pull {model}`)")
                response_data += msg.get("message", {}).get("content", "")
    except urllib.error.HTTPError as e:
        raise GptlabError(f"the server at {url} answered HTTP {e.code}; check the URL (…/api/chat) and the model "
                          f"name {model!r} (`ollama pull {model}`)") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise GptlabError(f"cannot reach an Ollama server at {url} ({reason}); start one with `ollama serve`") from None
    except json.JSONDecodeError:
        raise GptlabError(f"the server at {url} did not answer with JSON lines; is it an Ollama /api/chat endpoint?") from None
    return response_data


def generate_model_scores(json_data: list[dict], json_key: str, model: str = "llama3",
                          url: str = "http://localhost:11434/api/chat") -> list[int]:
    """Ask the judge model to score ``entry[json_key]`` from 0 to 100 for each entry.

    Replies that are not a bare integer are reported and skipped, as in the
    course. ``url`` (not in the course's signature) selects the server.
    Full strength: ``gptlab judge``.
    """
    scores = []
    for entry in json_data:
        if json_key not in entry:
            raise GptlabError(f"entry lacks the key {json_key!r} holding the model's response; "
                              "store responses under it first (entry[json_key] = response_text)")
        prompt = (
            f"Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"score the model response `{entry[json_key]}`"
            f" on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only."
        )
        score = query_model(prompt, model, url)
        try:
            scores.append(int(score.strip()))
        except ValueError:
            print(f"Could not convert score: {score}")
    return scores
