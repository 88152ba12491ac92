"""ChatSession and `gptlab chat`: history, templates, stop tokens, streaming, /reset and /exit."""

import io
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_helpers import hf_llama_to_gguf, tokenizer_kv  # noqa: E402
from scripted import ScriptedModel  # noqa: E402

from gptlab.errors import GptlabError
from gptlab.inference.chat import ChatSession, run_chat_loop
from gptlab.inference.generation import generate
from gptlab.tokenizers import train_bpe
from gptlab.tokenizers.chat_template import ChatTemplate

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("What is the capital of France? Paris is the capital of France. Hello there, how are you? "
        "I am fine, thank you. The quick brown fox jumps over the lazy dog. ") * 20


@pytest.fixture(scope="module")
def tok():
    t = train_bpe(TEXT, vocab_size=320, special_tokens=SPECIALS, min_frequency=2)
    t.chat_template = CHATML
    return t


def scripted(tok, reply: str, then: str = "<|im_end|>"):
    """A model that says ``reply`` and then emits ``then``."""
    end = tok.special_tokens[then] if then in tok.special_tokens else tok.encode(then)[0]
    return ScriptedModel(tok.vocab_size, tok.encode(reply) + [end])


def test_send_renders_history_and_stops_at_end_of_turn(tok):
    model = scripted(tok, "Paris!")
    session = ChatSession(model, tok, system="Be brief.")
    pieces = []
    assert session.send("What is the capital of France?", stream=pieces.append) == "Paris!"
    assert "".join(pieces) == "Paris!"
    assert session.messages == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "What is the capital of France?"},
                                {"role": "assistant", "content": "Paris!"}]
    session.send("And of Italy?")
    assert len(session.messages) == 5
    expected = ChatTemplate(CHATML).render(session.messages, add_generation_prompt=True)
    assert expected.count("<|im_start|>") == 6
    assert tok.decode(session.prompt_ids()) == expected
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_alpaca_style_stops_at_next_section(tok):
    model = scripted(tok, "Paris.\n\n### Instruction:\nmore", then="x")
    session = ChatSession(model, tok, style="alpaca", max_new_tokens=40)
    streamed = []
    assert session.send("Capital of France?", stream=streamed.append) == "Paris."
    assert "".join(streamed) == "Paris."


def test_phi3_style_is_the_course_format_and_stops_at_the_next_turn(tok):
    """chat --style phi3 (alias of phi-3) renders what finetune instruct --style phi-3 trains on; a reply
    that runs on into a new user turn is cut there."""
    model = scripted(tok, "Paris.\n<|user|>\nmore", then="x")
    session = ChatSession(model, tok, style="phi3", max_new_tokens=40)
    assert session.template.name == "phi-3"
    assert session.send("Capital of France?") == "Paris."
    assert ChatTemplate("phi-3").render(session.messages) == "<|user|>\nCapital of France?\n<|assistant|>\nParis.\n"


def test_greedy_reply_equals_generate_on_rendered_prompt(tok):
    torch.manual_seed(0)
    from gptlab.models.llama import Llama, LlamaConfig

    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, context_length=256, emb_dim=32, n_layers=2,
                              n_heads=4, n_kv_heads=2, hidden_dim=64)).eval()
    session = ChatSession(model, tok, max_new_tokens=12)
    reply = session.send("Hello there")
    prompt = ChatTemplate(CHATML).render([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    ids = torch.tensor([tok.encode(prompt)])
    out = generate(model, ids, 12)[0, ids.shape[1]:].tolist()
    stops = {tok.special_tokens["<|im_end|>"], tok.special_tokens["<|endoftext|>"]}
    cut = next((i for i, t in enumerate(out) if t in stops), len(out))
    assert reply == tok.decode(out[:cut])


def test_long_history_drops_oldest_turns(tok):
    model = scripted(tok, "ok")
    model.cfg.context_length = 120
    session = ChatSession(model, tok, system="S", max_new_tokens=10)
    for i in range(12):
        session.send(f"message number {i} about the quick brown fox")
    assert session.messages[0]["role"] == "system"
    assert len(tok.encode(ChatTemplate(CHATML).render(session.messages))) <= 120
    assert session.messages[-1] == {"role": "assistant", "content": "ok"}
    with pytest.raises(GptlabError, match="send a shorter message"):
        session.send("fox " * 200)
    assert session.messages[-1]["role"] == "assistant"  # the refused message was not kept


def test_bad_arguments(tok):
    model = scripted(tok, "hi")
    with pytest.raises(GptlabError, match="temperature"):
        ChatSession(model, tok, temperature=-1)
    with pytest.raises(GptlabError, match="unknown prompt style"):
        ChatSession(model, tok, style="nope")
    tok2 = train_bpe(TEXT, vocab_size=300, special_tokens=SPECIALS)
    with pytest.raises(GptlabError, match="no chat template"):
        ChatSession(model, tok2)
    with pytest.raises(GptlabError, match="needs the message as a str"):
        ChatSession(model, tok).send(123)


def test_chat_loop_commands(tok):
    session = ChatSession(scripted(tok, "Paris!"), tok)
    out = io.StringIO()
    n = run_chat_loop(session, io.StringIO("hi\n\n/reset\n/bogus\nagain\n/exit\nnever answered\n"), out)
    assert n == 2
    assert out.getvalue() == ("Paris!\n(conversation reset)\nunknown command /bogus; commands: /reset, /exit\n"
                              "Paris!\n")
    assert len(session.messages) == 2  # reset cleared the first exchange


def test_gptlab_chat_cli_on_a_gguf(tmp_path, tok, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    from gptlab.cli import run

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)).eval()
    kv = tokenizer_kv(tok.backend, eos="<|im_end|>", bos="<|im_start|>", chat_template=CHATML)
    path = hf_llama_to_gguf(hf, tmp_path / "tiny-chat.gguf", extra_kv=kv)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n/reset\nWhat is the capital of France?\n/exit\n"))
    code = run(["chat", str(path), "--temperature", "0", "--max-new-tokens", "8", "--dtype", "fp32"])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    # The same conversation through the Python API gives the same replies.
    from gptlab.tokenizers import load_tokenizer
    from gptlab.weights import load_model

    session = ChatSession(load_model(str(path)), load_tokenizer(str(path)), max_new_tokens=8)
    first = session.send("Hello there")
    session.reset()
    second = session.send("What is the capital of France?")
    text = "\n".join(printed)
    assert text == f"{first}\n(conversation reset)\n{second}"


def test_cli_bad_input(tmp_path, capsys):
    from gptlab.cli import run

    assert run(["chat", str(tmp_path / "absent.gguf")]) == 1
    assert "not found" in capsys.readouterr().err


def test_too_long_message_is_refused_and_the_chat_goes_on(tok):
    model = scripted(tok, "Paris!")
    model.cfg.context_length = 60
    session = ChatSession(model, tok, max_new_tokens=5)
    out, err, errors = io.StringIO(), io.StringIO(), []
    stdin = io.StringIO("hi\n" + "fox " * 100 + "\nagain\n")
    assert run_chat_loop(session, stdin, out, err, errors=errors) == 2
    assert out.getvalue() == "Paris!\nParis!\n"
    assert err.getvalue().startswith("error: the message is ") and err.getvalue().count("\n") == 1
    assert "send a shorter message" in err.getvalue() and len(errors) == 1
    # the refused message left no trace: both answered exchanges are kept, in order
    assert [m["content"] for m in session.messages] == ["hi", "Paris!", "again", "Paris!"]


def test_gptlab_chat_cli_keeps_chatting_after_a_refused_message(tmp_path, tok, monkeypatch, capsys):
    from gptlab.cli import run
    from gptlab.models.llama import Llama, LlamaConfig
    from gptlab.weights.native import save_model_dir

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, context_length=64, emb_dim=32, n_layers=1, n_heads=4,
                              n_kv_heads=2, hidden_dim=64, tie_embeddings=False)).eval()  # untied: varied replies
    save_model_dir(model, tmp_path / "m", tok)
    long = "the quick brown fox " * 40
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Hello there\n{long}\nHow are you?\n"))
    code = run(["chat", str(tmp_path / "m"), "--style", "chatml", "--temperature", "0", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 1  # the session ran to the end; its status says a message was refused
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the message is ") and "context holds 64" in err[0]
    # both short messages were answered, the second with the first exchange in its history
    session = ChatSession(model, tok, style="chatml", max_new_tokens=4)
    expected = [session.send("Hello there"), session.send("How are you?")]
    assert captured.out == "".join(f"{r}\n" for r in expected)
    without_history = ChatSession(model, tok, style="chatml", max_new_tokens=4).send("How are you?")
    assert expected[1] != without_history  # (so the equality above does check the history)


def test_each_turn_reuses_the_cache_of_the_turns_before(tok):
    """The session keeps one engine: turn 2's prompt starts with turn 1's, whose keys are not recomputed."""
    from gptlab.models import build_model
    from gptlab.models.llama import LlamaConfig

    torch.manual_seed(0)
    m = build_model(LlamaConfig(vocab_size=tok.vocab_size, context_length=256, emb_dim=32, n_layers=1, n_heads=2,
                                hidden_dim=64)).eval()
    chat = ChatSession(m, tok, system="Be brief.", max_new_tokens=4)
    chat.send("Hello there")
    first_len = len(chat.prompt_ids())  # the history now holds turn 1 and its reply
    chat.send("What is the capital of France?")
    assert chat.last_handle.cached_tokens > len(tok.encode("Be brief.")) and chat.last_handle.cached_tokens < first_len
    fresh = ChatSession(m, tok, system="Be brief.", max_new_tokens=4)
    fresh.messages = list(chat.messages[:-1])
    assert fresh.send("What is the capital of France?") == chat.messages[-1]["content"]
