"""The ``gptlab`` command line: one table of commands, each a typed function.

Every command is a plain Python function elsewhere in the package; its
signature is the command's flags and its docstring is the ``--help`` text
(jsonargparse builds the parser). Any command also reads ``--config FILE.yaml``
with the same keys, and flags given after it override the file.

Only the chosen command's module is imported, so ``gptlab --help`` is fast.

Errors are one line on stderr, starting ``error:``:

- exit 2, a usage error (unknown flag, a value of the wrong type, a missing
  required value): ``error: COMMAND: what is wrong; see gptlab COMMAND --help``;
  an unknown or missing command or subcommand says which ones exist (bare
  ``gptlab`` prints the command list);
- exit 1, the command refused its input (a :class:`gptlab.errors.GptlabError`,
  or a path it cannot read or write). Parameter names in the message
  (``top_k=0``) are shown as the flags the user typed (``--top-k 0``).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import inspect
import io
import os
import re
import sys
import typing

# name -> ("module:function", one-line summary shown by `gptlab --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("gptlab.training.commands:train", "pretrain (or continue) a model on a corpus"),
    "generate": ("gptlab.inference.generation:generate_command", "generate text from a model"),
    "chat": ("gptlab.inference.chat:chat_command", "chat with a model interactively"),
    "eval": ("gptlab.evaluation.commands:eval_command", "loss and perplexity of a model on a corpus"),
    "prepare": ("gptlab.data.commands:prepare", "tokenize a corpus into memmapped train/val token files"),
    "tokenizer train": ("gptlab.tokenizers.commands:train_tokenizer", "train a byte-level BPE tokenizer"),
    "tokenizer encode": ("gptlab.tokenizers.commands:encode", "print the token ids of a text"),
    "inspect": ("gptlab.inspect:inspect_command", "module tree, config, parameters, memory and FLOPs of a model"),
    "download": ("gptlab.weights.hub:download_command", "download a Hugging Face model repo into the cache"),
    "export": ("gptlab.weights.export:export_command", "export a model as a Hugging Face directory"),
    "finetune classify": ("gptlab.finetune.classify:classify_command", "fine-tune a classifier (e.g. SMS spam)"),
    "finetune instruct": ("gptlab.finetune.instruct:instruct_command", "instruction fine-tuning"),
    "classify": ("gptlab.finetune.classify:predict_command", "classify a text with a fine-tuned classifier"),
    "distill": ("gptlab.finetune.distill:distill_command", "knowledge distillation from a teacher model"),
    "judge": ("gptlab.evaluation.judge:judge_command", "score model responses with an LLM judge"),
    "fit": ("gptlab.fit.commands:fit_command", "will a model fit here, and how fast will it run"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: gptlab COMMAND [--help] [--config FILE.yaml] [flags]", "", "commands:"]
    lines += [f"  {n.ljust(width)}  {summary}" for n, (_, summary) in COMMANDS.items()]
    lines += ["", "Run `gptlab COMMAND --help` for a command's flags."]
    return "\n".join(lines)


def _resolve(argv: list[str]) -> tuple[str, list[str]]:
    """Longest command name that prefixes argv (e.g. 'tokenizer train')."""
    for n_words in (2, 1):
        name = " ".join(argv[:n_words])
        if name in COMMANDS:
            return name, argv[n_words:]
    return "", argv


_FLAG = re.compile(r"--([a-z0-9]+(?:_[a-z0-9]+)+)")


def _normalize(args: list[str], func) -> list[str]:
    """Turn the user's words into the parser's flags.

    - ``--max-steps`` is accepted for the parser's ``--max_steps``;
    - bare words fill the required parameters in order, so ``gptlab inspect
      gpt2-124m`` means ``--model gpt2-124m`` (both spellings work).
    - a boolean flag alone means true (``--compile`` = ``--compile true``).
    """
    required = [n for n, p in inspect.signature(func).parameters.items()
                if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD]
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # unresolvable annotation: treat every flag as taking a value
        hints = {}
    booleans = {n for n, t in hints.items() if _is_bool(t)}
    lists = {n for n, t in hints.items() if list in (typing.get_origin(t), *map(typing.get_origin, typing.get_args(t)))}
    flags, bare, given = [], [], set()
    list_values: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a[2:].partition("=")
            name = name.replace("-", "_")
            given.add(name)
            if name in lists and not (eq and value.startswith("[")) and not (
                    not eq and i + 1 < len(args) and args[i + 1].startswith("[")):
                # a list flag may repeat: --add a --add b (or --add a,b)
                if not eq:
                    value = args[i + 1] if i + 1 < len(args) else ""
                    i += 1
                list_values.setdefault(name, []).extend(v for v in value.split(",") if v)
            elif eq or name in ("help", "print_config"):
                flags.append(f"--{name}{eq}{value}")
            elif name in booleans and (i + 1 >= len(args) or args[i + 1].lower() not in _BOOL_WORDS):
                flags += [f"--{name}", "true"]  # a bare boolean flag means true
            else:
                flags.append(f"--{name}")
                if i + 1 < len(args):
                    flags.append(args[i + 1])
                    i += 1
        elif a == "-h":
            flags.append(a)
        else:
            bare.append(a)
        i += 1
    free = [n for n in required if n not in given]
    if len(bare) > len(free):
        extra = " ".join(bare[len(free):])
        raise _UsageError(f"unexpected argument(s): {extra}" + (f" (expected: {', '.join(free).upper()})" if free else ""))
    for name, value in zip(free, bare):
        flags += [f"--{name}", value]
    for name, values in list_values.items():
        flags += [f"--{name}", json.dumps(values)]
    return flags


def _is_bool(hint) -> bool:
    """``bool`` or ``bool | None`` (a tri-state flag whose None means "the default"): a bare flag means true."""
    return hint is bool or (typing.get_origin(hint) is not None and bool in typing.get_args(hint)
                            and set(typing.get_args(hint)) <= {bool, type(None)})


_BOOL_WORDS = {"true", "false", "yes", "no", "1", "0", "on", "off"}


class _UsageError(Exception):
    pass


def _dash(name: str) -> str:
    return "--" + name.replace("_", "-")


def _describe(hint) -> str:
    """What a flag of this type expects, in words (``int | None`` -> 'an integer')."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is not None and typing.get_origin(hint) is not list and len(args) == 1:
        hint = args[0]  # X | None: None is the default, the user types an X
    if typing.get_origin(hint) is list:
        return "a list (repeat the flag or separate values with commas)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(
        hint, str(hint).replace("typing.", ""))


def _parse_error(message: str, func) -> str:
    """jsonargparse's parse error (often several lines) as one line naming the flags the user types."""
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()] or ["invalid arguments"]
    first = lines[0]
    params = list(inspect.signature(func).parameters)
    if m := re.match(r'Parser key "(\w+)":\s*(.*)', first):  # a value of the wrong type
        try:
            hint = typing.get_type_hints(func).get(m.group(1))
        except Exception:
            hint = None
        if hint is None and m.group(2):  # e.g. --config: File does not exist: 'x.yaml'
            return f"{_dash(m.group(1))}: {m.group(2)[:1].lower()}{m.group(2)[1:]}"
        got = next((re.split(r"(?:Got|Given) value: ", ln, maxsplit=1)[1] for ln in reversed(lines)
                    if re.search(r"(?:Got|Given) value: ", ln)), None)
        flag = _dash(m.group(1))
        what = f"{flag} expects {_describe(hint)}" if hint is not None else f"bad value for {flag}"
        return what + (f", got {got!r}" if got is not None else "")
    if m := re.match(r"the following arguments are required: (.+)", first):
        names = [n.strip() for n in m.group(1).split(",")]
        return "missing " + ", ".join(f"{_dash(n)} {n.upper()}" for n in names)
    if m := re.match(r"argument --(\w+): expected one argument", first):
        return f"{_dash(m.group(1))} needs a value"
    if m := re.match(r"unrecognized arguments: (.+)", first):
        flags = [w.split("=")[0] for w in m.group(1).split() if w.startswith("--")]
        if not flags:
            return f"unexpected argument(s): {m.group(1)}"
        known = [_dash(n) for n in params] + ["--config"]
        close = difflib.get_close_matches(_dash(flags[0][2:]), known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown flag{'s' if len(flags) > 1 else ''} {' '.join(_dash(f[2:]) for f in flags)}{hint}"
    if m := re.match(r"Option '([\w-]+)' is not accepted", first):  # a key of the --config file
        key = m.group(1)
        if key.replace("-", "_") in params:  # a flag's spelling used as a key: max-steps
            return (f"the --config file has the key {key!r}; write it {key.replace('-', '_')} "
                    "(keys are the flag names with underscores)")
        close = difflib.get_close_matches(key.replace("-", "_"), params, n=1)
        return f"unknown key {key!r} in the --config file" + (f" (did you mean {close[0]}?)" if close else "")
    if m := re.match(r"Unexpected config: (.*)", first):
        return ("the --config file must hold a YAML mapping of flag names to values (max_steps: 100), "
                f"got {m.group(1)!r}")
    if m := re.match(r"Problems parsing config: (.*)", " ".join(lines)):
        return f"the --config file is not valid YAML ({m.group(1)})"
    return _FLAG.sub(lambda f: _dash(f.group(1)), " ".join(lines))


def _flag_names(message: str, func) -> str:
    """Show ``max_new_tokens=0`` as ``--max-new-tokens 0`` for the command's own parameters.

    The Python API names parameters (``validate_sampling`` says ``top_k=0``); on
    the command line the same message should name the flag that was typed.
    """
    params = set(inspect.signature(func).parameters)
    if not params:
        return message
    # model config fields the command sets under another flag name (--dropout sets drop_rate)
    fields = {f: flag for f, flag in _FIELD_FLAGS.items() if flag in params and f not in params}
    names = sorted(params | set(fields), key=len, reverse=True)
    pattern = re.compile(r"(?<![\w./\\-])(" + "|".join(map(re.escape, names)) + r")=")
    message = pattern.sub(lambda m: _dash(fields.get(m.group(1), m.group(1))) + " ", message)
    # a message that already names a flag but spells it the parser's way: --allowed_special
    return _FLAG.sub(lambda m: _dash(m.group(1)) if m.group(1) in params else m.group(0), message)


# ModelConfig field -> the flag that sets it, where the two names differ
_FIELD_FLAGS = {"drop_rate": "dropout"}


class _DashedHelp(io.TextIOBase):
    """Shows flags as --max-steps in help and usage text (the parser's names use _)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> int:
        self.stream.write(_FLAG.sub(lambda m: "--" + m.group(1).replace("_", "-"), s))
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:  # progress bars ask; answer for the real stream
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


def _subcommands(group: str) -> list[str]:
    """The second words of the commands in a group: 'finetune' -> ['classify', 'instruct']."""
    return [n.split()[1] for n in COMMANDS if n.startswith(group + " ")]


def _unknown_command(argv: list[str]) -> str:
    """One line for a first word (or group + second word) that names no command."""
    group = argv[0]
    if subs := _subcommands(group):
        if len(argv) == 1 or argv[1].startswith("-"):
            return f"missing subcommand: gptlab {group} {'|'.join(subs)}; run `gptlab {group} --help` for the list"
        close = difflib.get_close_matches(argv[1], subs, n=1)
        return (f"unknown subcommand {argv[1]!r} of gptlab {group} (choose: {', '.join(subs)})"
                + (f"; did you mean `gptlab {group} {close[0]}`?" if close else ""))
    close = difflib.get_close_matches(group, sorted({n.split()[0] for n in COMMANDS}), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown command {group!r}{hint}; run `gptlab --help` for the list"


def run(argv: list[str]) -> int:
    """Run one command line; returns the exit status."""
    if not argv:  # no command: the list, as a usage error
        print(_usage() + "\n\nerror: missing command: gptlab COMMAND (one of the list above)", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from gptlab import __version__

        print(__version__)
        return 0
    name, rest = _resolve(argv)
    if not name and _subcommands(argv[0]) and len(argv) > 1 and argv[1] in ("-h", "--help"):
        group = argv[0]  # `gptlab finetune --help`: that group's commands
        width = max(len(n) for n in COMMANDS if n.startswith(group + " "))
        print(f"usage: gptlab {group} {'|'.join(_subcommands(group))} [--help] [flags]\n\ncommands:")
        print("\n".join(f"  {n.ljust(width)}  {summary}" for n, (_, summary) in COMMANDS.items()
                         if n.startswith(group + " ")))
        return 0
    if not name:
        print(f"error: {_unknown_command(argv)}", file=sys.stderr)
        return 2
    target, _summary = COMMANDS[name]
    module, func_name = target.split(":")
    from argparse import ArgumentError

    from jsonargparse import CLI

    from gptlab.errors import GptlabError

    func = None
    try:
        func = getattr(importlib.import_module(module), func_name)
        wants_help = any(a in ("-h", "--help") for a in rest)
        # Help and usage text show --dashed-flags; a command's own output is never rewritten.
        out = contextlib.redirect_stdout(_DashedHelp(sys.stdout)) if wants_help else contextlib.nullcontext()
        with out:
            result = CLI(func, args=_normalize(rest, func), prog=f"gptlab {name}", as_positional=False,
                         fail_untyped=False, env_prefix="GPTLAB", default_env=False, exit_on_error=False)
    except GptlabError as e:
        text = re.sub(r"\s*\n\s*", " ", str(e).strip())  # one line, whatever the message held
        print(f"error: {_flag_names(text, func) if func is not None else text}", file=sys.stderr)
        return 1
    except (_UsageError, ArgumentError) as e:
        what = str(e) if isinstance(e, _UsageError) else _parse_error(e.message, func)
        print(f"error: {name}: {what}; see gptlab {name} --help", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `gptlab fit --json | head`
        sys.stderr.close()
        return 0
    except UnicodeDecodeError as e:
        print(f"error: a file is not valid UTF-8 text ({e.reason} at byte {e.start}); "
              "convert it to UTF-8 and try again", file=sys.stderr)
        return 1
    except OSError as e:  # missing, unreadable or unwritable paths the command did not check itself
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; check the path and its permissions", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return 0


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
