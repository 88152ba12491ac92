"""Instruction fine-tuning: prompt formats, the course's collate, splits, a short run, LoRA resume."""

import json

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.finetune.instruct import (collate, course_split, encode_example, finetune_instruct, format_example,
                                      format_input, load_instruction_data)


def test_course_collate_exact():
    # The course's hand-made batch (pad = end-of-text = 50256).
    x, y = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], pad_id=50256)
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert y.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]


def test_collate_truncation_masking_and_distinct_eos():
    x, y = collate([[0, 1, 2, 3, 4], [5, 6]], pad_id=0, eos_id=99, allowed_max_length=3)
    assert x.tolist() == [[0, 1, 2], [5, 6, 0]] and y.tolist() == [[1, 2, 3], [6, 99, -100]]
    # Prompt masking: with prompts of 3 and 1 tokens, targets that are prompt tokens are ignored.
    x, y = collate([[10, 11, 12, 13, 14], [20, 21]], pad_id=0, eos_id=99, prompt_lengths=[3, 1], mask_prompt=True)
    assert y.tolist() == [[-100, -100, 13, 14, 99], [21, 99, -100, -100, -100]]
    with pytest.raises(GptlabError, match="prompt length"):
        collate([[1]], pad_id=0, mask_prompt=True)
    with pytest.raises(GptlabError, match="empty batch"):
        collate([], pad_id=0)


def test_alpaca_and_phi3_formats_exact():
    e = {"instruction": "Rewrite the sentence.", "input": "The cat sat.", "output": "The cat was sitting."}
    assert format_input(e) == ("Below is an instruction that describes a task. Write a response that "
                               "appropriately completes the request.\n\n### Instruction:\nRewrite the sentence."
                               "\n\n### Input:\nThe cat sat.")
    assert format_example(e)[0].endswith("### Input:\nThe cat sat.\n\n### Response:\n")
    assert "### Input" not in format_input(dict(e, input=""))
    assert format_example(e, "phi3") == ("<|user|>\nRewrite the sentence.\nThe cat sat.\n<|assistant|>\n",
                                         "The cat was sitting.")
    assert format_example(e, "phi-3") == format_example(e, "phi3")  # one name for `chat --style` and this
    with pytest.raises(GptlabError, match="unknown prompt style"):
        format_example(e, "vicuna")


@pytest.mark.parametrize("style", ["alpaca", "phi-3", "phi3", "chatml", "llama-3"])
def test_a_model_tuned_in_a_style_chats_in_the_same_format(style):
    """finetune instruct --style S and chat --style S render one definition: the training prompt of an
    instruction is exactly what the chat sends for that message."""
    from gptlab.inference.chat import ChatSession
    from gptlab.tokenizers import train_bpe

    tok = train_bpe("Name three primary colors. Red, blue and yellow. " * 20, vocab_size=300,
                    special_tokens=["<|endoftext|>"])

    class Model(torch.nn.Module):
        cfg = type("Cfg", (), {"context_length": 4096})()

    entry = {"instruction": "Name three primary colors.", "input": "", "output": "Red, blue and yellow."}
    session = ChatSession(Model(), tok, style=style)
    session.messages.append({"role": "user", "content": entry["instruction"]})
    prompt = format_example(entry, style, tok)[0]
    assert tok.decode(session.prompt_ids()) == prompt
    assert session.prompt_ids() == tok.encode(prompt, allowed_special="all")


def test_chat_style_uses_the_tokenizer_template(char_tok):
    class T:
        chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
        bos_token = eos_token = ""

    e = {"instruction": "Hi", "input": "there", "output": "Hello"}
    assert format_example(e, "chat", T()) == ("<user>Hi\n\nthere\n<assistant>", "Hello")
    with pytest.raises(GptlabError, match="needs a tokenizer with a chat template"):
        format_example(e, "chat", char_tok)


def test_course_split_and_formats(tmp_path, instructions_path):
    entries = load_instruction_data(instructions_path)
    train, test, val = course_split(entries)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train[0] == entries[0] and test[0] == entries[935] and val[-1] == entries[-1]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "content": "4"}]}) + "\n")
    (e,) = load_instruction_data(chat)
    assert e["instruction"] == "2+2?" and e["output"] == "4"
    (tmp_path / "bad.json").write_text('[{"question": "x"}]')
    with pytest.raises(GptlabError, match="record 1 needs 'instruction'"):
        load_instruction_data(tmp_path / "bad.json")
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"}]}) + "\n")
    with pytest.raises(GptlabError, match="last message must be the assistant"):
        load_instruction_data(chat)


def test_a_bad_jsonl_line_is_named_by_its_line_in_the_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n')
    with pytest.raises(GptlabError, match=r"d.jsonl line 2 is not valid JSON \(Expecting value at column 32\)"):
        load_instruction_data(p)
    p.write_text('{"instruction": "a", "output": "b"}\n\n{"question": "c"}\n')
    with pytest.raises(GptlabError, match="d.jsonl line 3 needs 'instruction' and 'output' keys"):
        load_instruction_data(p)


def test_encode_example_prompt_length(char_tok):
    e = {"instruction": "Say hi.", "input": "", "output": "hi"}
    ids, n_prompt = encode_example(char_tok, e, "alpaca")
    assert char_tok.decode(ids[:n_prompt]).endswith("### Response:\n") and char_tok.decode(ids[n_prompt:]) == "hi"


def _small_data(tmp_path, instructions_path, n=60):
    entries = json.loads(instructions_path.read_text())
    short = [e for e in entries if len(e["instruction"]) + len(e["output"]) + len(e["input"]) < 90][:n]
    p = tmp_path / "small.json"
    p.write_text(json.dumps(short))
    return p


def test_short_run_writes_responses(tmp_path, base_dir, instructions_path):
    data = _small_data(tmp_path, instructions_path)
    s = finetune_instruct(str(base_dir), str(data), tmp_path / "run", max_steps=6, batch_size=8, lr=3e-3,
                          style="phi3", mask_prompt=True, allowed_max_length=96, eval_every=3, eval_iters=1, max_new_tokens=5,
                          max_test=3, trainable="all", precision="fp32", device="cpu", progress=False)
    assert (s["n_train"], s["n_test"], s["n_val"]) == (51, 6, 3)
    assert json.loads((tmp_path / "run" / "instruct_config.json").read_text())["settings"]["style"] == "phi-3"
    rows = json.loads((tmp_path / "run" / "instruction-data-with-response.json").read_text())
    assert len(rows) == 3 and all(set(r) == {"instruction", "input", "output", "model_response"} for r in rows)
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] + 1e-6 or recs[-1]["step"] == 6
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    with pytest.raises(GptlabError, match="nothing is left to learn"):
        finetune_instruct(str(base_dir), str(data), tmp_path / "run2", max_steps=1, mask_prompt=True,
                          allowed_max_length=20, device="cpu", progress=False)


def test_lora_run_resumes_exactly(tmp_path, base_dir, instructions_path):
    from safetensors.torch import load_file

    data = _small_data(tmp_path, instructions_path, n=40)
    kw = dict(batch_size=4, lr=5e-3, allowed_max_length=64, eval_every=2, eval_iters=1, max_new_tokens=2,
              max_test=1, trainable="lora", lora_rank=2, precision="fp32", device="cpu", progress=False)
    finetune_instruct(str(base_dir), str(data), tmp_path / "full", max_steps=4, **kw)
    finetune_instruct(str(base_dir), str(data), tmp_path / "part", max_steps=2, **kw)
    finetune_instruct("", "", tmp_path / "unused", resume=tmp_path / "part", max_steps=4, **kw)
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "part" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)  # the adapters did train
    with pytest.raises(GptlabError, match="no such directory; give the --out directory of an earlier instruction"):
        finetune_instruct("", "", tmp_path / "x", resume=tmp_path / "nope", **kw)
    with pytest.raises(GptlabError, match=r"is not an instruction run \(no instruct_config.json\)"):
        finetune_instruct("", "", tmp_path / "x", resume=base_dir)
    # 32 train entries, batches of 4: 8 steps per epoch. At step 4 = epoch 0.5 already.
    with pytest.raises(GptlabError, match=r"is already at step 4 \(epoch 0.5\); give a larger --max-steps/--epochs"):
        finetune_instruct("", "", tmp_path / "x", resume=tmp_path / "part", epochs=0.5)
    with pytest.raises(GptlabError, match=r"--lr 0.1 differs from the 0.005 that"):
        finetune_instruct("", "", tmp_path / "x", resume=tmp_path / "part", lr=0.1, max_steps=5)


def test_cli_errors(tmp_path, base_dir, capsys):
    from gptlab.cli import run as cli_run

    assert cli_run(["finetune", "instruct", "--data", "instruction-data"]) == 1
    assert "--model REF" in capsys.readouterr().err
    assert cli_run(["finetune", "instruct", "--model", str(base_dir), "--data", str(tmp_path / "no.json"),
                    "--out", str(tmp_path / "r")]) == 1
    assert "instruction data" in capsys.readouterr().err
    assert cli_run(["finetune", "instruct", "--model", str(base_dir), "--style", "vicuna",
                    "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "unknown prompt style 'vicuna'; choose one of alpaca, phi-3, chatml, llama-3, chat" in err
    for flag in (["--epochs", "0"], ["--epochs", "-1"], ["--max-steps", "0"]):
        assert cli_run(["finetune", "instruct", "--model", str(base_dir), "--out", str(tmp_path / "r"), *flag]) == 1
        assert f"error: {flag[0]} {flag[1]} must be" in capsys.readouterr().err


def test_local_paths_are_recorded_absolute(tmp_path, base_dir, instructions_path, monkeypatch):
    import shutil

    shutil.copytree(base_dir, tmp_path / "base")
    _small_data(tmp_path, instructions_path, n=20)
    monkeypatch.chdir(tmp_path)
    finetune_instruct("base", "small.json", "run", max_steps=1, batch_size=4, allowed_max_length=32, eval_iters=1,
                      trainable="last-1",
                      max_new_tokens=1, max_test=1, precision="fp32", device="cpu", progress=False)
    s = json.loads((tmp_path / "run" / "instruct_config.json").read_text())["settings"]
    assert (s["model"], s["data"]) == (str(tmp_path / "base"), str(tmp_path / "small.json"))


def test_overwrite_with_a_bad_data_path_leaves_the_old_run_whole(tmp_path, base_dir, instructions_path, capsys):
    """Issue 16: `finetune instruct --overwrite` used to delete the old run before checking --data."""
    import hashlib

    data = _small_data(tmp_path, instructions_path, n=20)
    finetune_instruct(str(base_dir), str(data), tmp_path / "run", max_steps=1, batch_size=4, allowed_max_length=32,
                      eval_iters=1, trainable="last-1", max_new_tokens=1, max_test=1, precision="fp32", device="cpu",
                      progress=False)

    def digest():
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file())
                              ).hexdigest()

    before = digest()
    from gptlab.cli import run as cli_run

    assert cli_run(["finetune", "instruct", "--model", str(base_dir), "--data", str(tmp_path / "typo.json"),
                    "--out", str(tmp_path / "run"), "--overwrite"]) == 1
    assert "instruction data" in capsys.readouterr().err
    assert digest() == before


def test_directories_and_a_single_object_get_their_own_messages(tmp_path):
    """A directory said 'not found'; one JSON object said 'only 0 training entries' (issue 16)."""
    from gptlab.finetune.instruct import load_instruction_data

    (tmp_path / "d").mkdir()
    with pytest.raises(GptlabError, match="is a directory; give a .json/.jsonl file inside it"):
        load_instruction_data(tmp_path / "d")
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}))
    assert len(load_instruction_data(one)) == 1  # one object = one record
