"""The command-line dispatcher: help, dashed flags, positionals, bare booleans, errors."""

import pytest

from gptlab.cli import COMMANDS, run
from gptlab.cli_parser import parse


def _parsed(argv, func):
    return parse(func, argv, prog="test")


def _with_defaults(func, given):
    """Every parameter of ``func``: ``given``, and the defaults for the rest."""
    import inspect

    return {n: given.get(n, p.default) for n, p in inspect.signature(func).parameters.items()}


def _f(model: str, text: str, max_steps: int = 1, compile: bool = False, name: str | None = None):
    return model, text, max_steps, compile, name


@pytest.mark.parametrize("argv,expected", [
    (["m", "hello"], {"model": "m", "text": "hello"}),
    (["--model", "m", "--text=hi"], {"model": "m", "text": "hi"}),
    (["m", "--max-steps", "5", "t"], {"max_steps": 5, "model": "m", "text": "t"}),
    (["m", "--max_steps", "5", "t"], {"max_steps": 5, "model": "m", "text": "t"}),  # the Python spelling too
    (["--compile", "m", "t"], {"compile": True, "model": "m", "text": "t"}),
    (["--compile", "false", "m", "t"], {"compile": False, "model": "m", "text": "t"}),
    (["--text", "t", "m"], {"text": "t", "model": "m"}),
])
def test_normalize(argv, expected):
    assert _parsed(argv, _f) == _with_defaults(_f, expected)


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
    assert "unknown command 'trian' (did you mean train?)" in capsys.readouterr().err
    assert run(["tokenizer"]) == 2
    assert capsys.readouterr().err.startswith("error: missing subcommand: gptlab tokenizer train|encode;")
    assert run(["finetune", "--lr", "3"]) == 2
    assert capsys.readouterr().err.startswith("error: missing subcommand: gptlab finetune classify|instruct;")
    assert run(["finetune", "foo"]) == 2
    assert capsys.readouterr().err.strip() == ("error: unknown subcommand 'foo' of gptlab finetune "
                                               "(choose: classify, instruct)")
    assert run(["inspect", "gpt2-nano", "extra"]) == 2
    assert "unexpected argument(s): extra" in capsys.readouterr().err


def test_no_command_lists_the_commands_as_a_usage_error(capsys):
    assert run([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "train" in captured.err and "finetune classify" in captured.err
    assert captured.err.rstrip().splitlines()[-1].startswith("error: missing command")


def test_group_help_lists_its_subcommands(capsys):
    assert run(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "finetune classify" in out and "finetune instruct" in out and "train" not in out


def test_bare_boolean_flag_end_to_end(capsys):
    assert run(["inspect", "gpt2-nano", "--as-json"]) == 0
    assert capsys.readouterr().out.lstrip().startswith("{")


def _h(model: str, balanced: bool | None = None, limit: int | None = None):
    return model, balanced, limit


@pytest.mark.parametrize("argv,expected", [
    (["m", "--balanced", "--limit", "200"], {"balanced": True, "limit": 200, "model": "m"}),
    (["m", "--limit", "200", "--balanced"], {"limit": 200, "balanced": True, "model": "m"}),
    (["m", "--balanced", "false"], {"balanced": False, "model": "m"}),
    (["--balanced", "m"], {"balanced": True, "model": "m"}),
])
def test_optional_boolean_is_a_bare_flag_too(argv, expected):
    assert _parsed(argv, _h) == _with_defaults(_h, expected)


def test_optional_boolean_end_to_end(monkeypatch, capsys):
    import gptlab.cli as cli

    seen = {}

    def probe(model: str, balanced: bool | None = None, limit: int | None = None) -> int:
        seen.update(model=model, balanced=balanced, limit=limit)
        return 0

    import types

    mod = types.ModuleType("gptlab_probe")
    mod.probe = probe
    monkeypatch.setitem(__import__("sys").modules, "gptlab_probe", mod)
    monkeypatch.setitem(cli.COMMANDS, "probe", ("gptlab_probe:probe", "test"))
    assert run(["probe", "m", "--balanced", "--limit", "200"]) == 0
    assert seen == {"model": "m", "balanced": True, "limit": 200}
    assert run(["probe", "m", "--balanced"]) == 0 and seen["balanced"] is True
    assert run(["probe", "m"]) == 0 and seen["balanced"] is None


def _g(model: str, add: list[str] | None = None, targets: list[str] | None = None):
    return model, add, targets


def test_list_flags_repeat_or_take_commas():
    assert _parsed(["m", "--add", "a", "--add", "b,c"], _g) == _with_defaults(_g, {"model": "m", "add": ["a", "b", "c"]})
    assert _parsed(["m", "--add", '["x"]'], _g) == _with_defaults(_g, {"add": ["x"], "model": "m"})


def test_command_output_is_never_rewritten(capsys):
    assert run(["inspect", "gpt2-nano", "--as-json"]) == 0
    assert "max_steps" not in capsys.readouterr().out  # (sanity) and no flag-like text was touched


def test_unwritable_path_is_one_line(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    code = run(["prepare", "--data", str(target / "nope.txt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error:") and len(err.splitlines()) == 1


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), captured.err
    assert "usage:" not in captured.err and captured.out == ""
    return err


@pytest.mark.parametrize("argv,expected", [
    (["inspect", "gpt2-nano", "--bogus", "1"], "error: inspect: unknown flag --bogus; see gptlab inspect --help"),
    (["inspect", "gpt2-nano", "--as-jsn"], "error: inspect: unknown flag --as-jsn (did you mean --as-json?); "
                                           "see gptlab inspect --help"),
    (["inspect", "gpt2-nano", "--as-json=maybe"], "error: inspect: --as-json expects true or false, got 'maybe'; "
                                                  "see gptlab inspect --help"),
    (["generate", "--model", "m", "--max-new-tokens", "abc"],
     "error: generate: --max-new-tokens expects an integer, got 'abc'; see gptlab generate --help"),
    (["generate", "--model", "m", "--top-k", "x"],  # int | None: the union's many-line message
     "error: generate: --top-k expects an integer, got 'x'; see gptlab generate --help"),
    (["train", "--logger", "tensorboard,bogus"],  # a list of Literal: name the choices, not "a list"
     "error: train: --logger expects one of csv, tensorboard, wandb, got 'bogus'; see gptlab train --help"),
    (["generate", "--model", "m", "--max-new-tokens"],
     "error: generate: --max-new-tokens needs a value; see gptlab generate --help"),
    (["generate"], "error: generate: missing --model MODEL; see gptlab generate --help"),
    (["tokenizer", "encode"], "error: tokenizer encode: missing --text TEXT; see gptlab tokenizer encode --help"),
    (["inspect", "gpt2-nano", "extra"],
     "error: inspect: unexpected argument(s): extra (expected: MODEL); see gptlab inspect --help"),
])
def test_parse_errors_are_one_line_exit_2(argv, expected, capsys):
    assert run(argv) == 2
    assert _one_error_line(capsys) == expected


def test_config_file_errors_are_one_line(tmp_path, capsys):
    bad = {"type.yaml": "max_steps: abc\n", "key.yaml": "max_stepz: 3\n", "yaml.yaml": "a: [\n",
           "scalar.yaml": "vm\n"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    expected = {"type.yaml": "--max-steps expects an integer, got 'abc'",
                "key.yaml": "unknown key 'max_stepz' in the --config file (did you mean max_steps?)",
                "yaml.yaml": "the --config file is not valid YAML",
                "scalar.yaml": "the --config file must hold a YAML mapping"}
    for name, what in expected.items():
        assert run(["train", "--config", str(tmp_path / name)]) == 2
        assert _one_error_line(capsys).startswith(f"error: train: {what}")
    assert run(["train", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "file does not exist" in _one_error_line(capsys)


def test_value_errors_name_the_typed_flags(capsys):
    # validate_sampling (Python API) says top_k=0; the command line names the flag.
    assert run(["generate", "gpt2-nano", "--top-k", "0"]) == 1
    assert _one_error_line(capsys) == "error: --top-k 0 must be >= 1 (or omitted to disable)"
    assert run(["generate", "gpt2-nano", "--max-new-tokens", "-1"]) == 1
    assert _one_error_line(capsys) == "error: --max-new-tokens -1 must be >= 0"
    from gptlab.errors import GptlabError
    from gptlab.inference.sampling import validate_sampling

    with pytest.raises(GptlabError, match=r"^top_k=0 must"):  # the Python API keeps its own names
        validate_sampling(top_k=0)


def test_flag_names_rewrites_only_the_commands_parameters():
    from gptlab.cli import _flag_names

    def cmd(max_length: int = 1, stride: int | None = None, lr: float = 1.0):
        pass

    assert _flag_names("stride=9 must not exceed max_length=4", cmd) == "--stride 9 must not exceed --max-length 4"
    assert _flag_names("lr=0 must be > 0", cmd) == "--lr 0 must be > 0"
    # other names, longer names ending in a parameter's name, and paths are left alone
    assert _flag_names("qkv_bias=True; base_lr=1; runs/lr=0.1/x", cmd) == "qkv_bias=True; base_lr=1; runs/lr=0.1/x"


@pytest.mark.parametrize("argv,msg", [
    (["train", "--dropout", "2"], "error: --dropout 2 must be in [0, 1)"),  # the config field is drop_rate
    (["tokenizer", "encode", "hi", "--allowed-special", "some"], "error: --allowed-special must be 'all' or 'none'"),
])
def test_errors_name_the_flag_as_typed(argv, msg, tmp_path, capsys):
    assert run([*argv, *(["--out", str(tmp_path / "run")] if argv[0] == "train" else [])]) == 1
    err = capsys.readouterr().err
    assert err.startswith(msg) and "drop_rate" not in err and "--allowed_special" not in err
    assert not (tmp_path / "run").exists()


def test_dashed_key_in_a_config_file_suggests_the_underscore_spelling(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max-steps: 3\n")
    assert run(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train: the --config file has the key 'max-steps'; write it max_steps")
    assert "is not accepted" not in err and err.count("\n") == 1


def _synthesized():
    """A command made from a settings table, as recipes do: ``__signature__``, ``__annotations__``, ``__doc__``."""
    import inspect
    import typing

    fields = [("model", str, inspect.Parameter.empty), ("max_steps", int | None, None),
              ("compile", bool, False), ("mode", typing.Literal["logits", "text"], "logits"),
              ("sizes", list[int] | None, None)]
    seen = {}

    def command(**kwargs):
        seen.clear()
        seen.update(kwargs)
        return 0

    command.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=t) for n, t, d in fields])
    command.__annotations__ = {n: t for n, t, _ in fields}
    command.__doc__ = ("Train from a settings table.\n\nArgs:\n    model: the model to start from.\n"
                       "    max_steps: optimizer steps\n        (default: until the data runs out).\n")
    return command, seen


def test_a_synthesized_signature_is_parsed_and_documented(monkeypatch, capsys):
    import sys
    import types

    import gptlab.cli as cli

    command, seen = _synthesized()
    mod = types.ModuleType("gptlab_synth")
    mod.command = command
    monkeypatch.setitem(sys.modules, "gptlab_synth", mod)
    monkeypatch.setitem(cli.COMMANDS, "synth", ("gptlab_synth:command", "test"))
    assert run(["synth", "m", "--max-steps", "3", "--compile", "--mode", "text", "--sizes", "1,2", "--sizes", "3"]) == 0
    assert seen == {"model": "m", "max_steps": 3, "compile": True, "mode": "text", "sizes": [1, 2, 3]}
    assert run(["synth", "--model", "m"]) == 0
    assert seen == {"model": "m", "max_steps": None, "compile": False, "mode": "logits", "sizes": None}
    assert run(["synth", "m", "--mode", "tokens"]) == 2
    assert _one_error_line(capsys) == ("error: synth: --mode expects one of logits, text, got 'tokens'; "
                                       "see gptlab synth --help")
    assert run(["synth", "m", "--sizes", "1,x"]) == 2
    assert _one_error_line(capsys) == ("error: synth: --sizes expects an integer, got 'x'; "  # the item, not "a list"
                                       "see gptlab synth --help")
    with pytest.raises(SystemExit) as e:
        run(["synth", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Train from a settings table." in out and "the model to start from." in out
    assert "optimizer steps (default: until the data runs out)." in out and "--max-steps" in out


def test_the_parser_raises_a_structured_error():
    from gptlab.cli_parser import UsageError

    with pytest.raises(UsageError) as e:
        parse(_f, ["m", "t", "--max-steps", "x"], prog="test")
    assert (e.value.kind, e.value.name, e.value.value) == ("bad_value", "max_steps", "x")
    with pytest.raises(UsageError) as e:
        parse(_f, ["m", "t", "--max-stepz", "1"], prog="test")
    assert e.value.kind == "unknown_flag" and e.value.flags == ("--max-stepz",)
    assert e.value.suggestion == "--max-steps"
    with pytest.raises(UsageError) as e:
        parse(_f, [], prog="test")
    assert e.value.kind == "missing" and e.value.names == ("model", "text")
    with pytest.raises(UsageError) as e:
        parse(_f, ["m", "t", "u"], prog="test")
    assert e.value.kind == "unexpected" and e.value.words == ("u",)


def test_config_file_sets_flags_at_its_place(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max_steps: 7\ncompile: true\nname: null\n")
    assert parse(_f, ["m", "t", "--max-steps", "2", "--config", str(cfg)], prog="test")["max_steps"] == 7
    got = parse(_f, ["--config", str(cfg), "--max-steps", "2", "m", "t"], prog="test")
    assert got == {"model": "m", "text": "t", "max_steps": 2, "compile": True, "name": None}


def test_a_word_after_a_boolean_flag_is_named_as_its_bad_value(capsys):
    """`train --compile maybe` said 'unexpected argument(s): maybe'; the word was meant for --compile."""
    assert run(["train", "--compile", "maybe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: train: --compile expects true or false, got 'maybe'; see gptlab train --help"
