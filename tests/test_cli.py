"""The command-line dispatcher: help, dashed flags, positionals, bare booleans, errors."""

import pytest

from gptlab.cli import COMMANDS, _normalize, run


def _f(model: str, text: str, max_steps: int = 1, compile: bool = False, name: str | None = None):
    return model, text, max_steps, compile, name


@pytest.mark.parametrize("argv,expected", [
    (["m", "hello"], ["--model", "m", "--text", "hello"]),
    (["--model", "m", "--text=hi"], ["--model", "m", "--text=hi"]),
    (["m", "--max-steps", "5", "t"], ["--max_steps", "5", "--model", "m", "--text", "t"]),
    (["--compile", "m", "t"], ["--compile", "true", "--model", "m", "--text", "t"]),
    (["--compile", "false", "m", "t"], ["--compile", "false", "--model", "m", "--text", "t"]),
    (["--text", "t", "m"], ["--text", "t", "--model", "m"]),
])
def test_normalize(argv, expected):
    assert _normalize(argv, _f) == expected


def test_help_lists_every_command(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_command_help_uses_dashes(capsys):
    with pytest.raises(SystemExit) as e:
        run(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--max-steps" in out and "--max_steps" not in out
    assert "optimizer steps" in out  # from the docstring


def test_unknown_command_and_extra_words(capsys):
    assert run(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert run(["tokenizer"]) == 2
    assert "tokenizer train" in capsys.readouterr().err
    assert run(["inspect", "gpt2-nano", "extra"]) == 2
    assert "unexpected argument(s): extra" in capsys.readouterr().err


def test_bare_boolean_flag_end_to_end(capsys):
    assert run(["inspect", "gpt2-nano", "--as-json"]) == 0
    assert capsys.readouterr().out.lstrip().startswith("{")


def _g(model: str, add: list[str] | None = None, targets: list[str] | None = None):
    return model, add, targets


def test_list_flags_repeat_or_take_commas():
    assert _normalize(["m", "--add", "a", "--add", "b,c"], _g) == ["--model", "m", "--add", '["a", "b", "c"]']
    assert _normalize(["m", "--add", '["x"]'], _g) == ["--add", '["x"]', "--model", "m"]


def test_command_output_is_never_rewritten(capsys):
    assert run(["inspect", "gpt2-nano", "--as-json"]) == 0
    assert "max_steps" not in capsys.readouterr().out  # (sanity) and no flag-like text was touched
    from gptlab.cli import _DashedHelp
    import io

    buf = io.StringIO()
    _DashedHelp(buf).write("use --max_new_tokens")
    assert buf.getvalue() == "use --max-new-tokens"


def test_unwritable_path_is_one_line(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    code = run(["prepare", "--data", str(target / "nope.txt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error:") and len(err.splitlines()) == 1
