"""The ``gptlab`` command line: one table of commands, each a typed function.

Every command is a plain Python function elsewhere in the package; its
signature is the command's flags and its docstring is the ``--help`` text
(:mod:`gptlab.cli_parser` reads them; it is the one parser). Any command also
reads ``--config FILE.yaml`` with the same keys, and flags given after it
override the file.

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

import difflib
import importlib
import inspect
import os
import re
import sys

from gptlab.cli_parser import UsageError, dashed, parse

# name -> ("module:function", one-line summary shown by `gptlab --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("gptlab.training.commands:train", "pretrain (or continue) a model on a corpus"),
    "generate": ("gptlab.inference.generation:generate_command", "generate text from a model"),
    "chat": ("gptlab.inference.chat:chat_command", "chat with a model interactively"),
    "eval": ("gptlab.evaluation.commands:eval_command", "loss and perplexity of a model on a corpus"),
    "prepare": ("gptlab.data.commands:prepare", "tokenize a corpus into memmapped token files (sharded, curated, parallel)"),
    "tokenizer train": ("gptlab.tokenizers.commands:train_tokenizer", "train a byte-level BPE tokenizer"),
    "tokenizer encode": ("gptlab.tokenizers.commands:encode", "print the token ids of a text"),
    "inspect": ("gptlab.inspect:inspect_command", "module tree, config, parameters, memory and FLOPs of a model"),
    "download": ("gptlab.weights.hub:download_command", "download a Hugging Face model repo into the cache"),
    "cache": ("gptlab.cache:cache_command", "list cached models and files (sizes, last use, free disk)"),
    "cache rm": ("gptlab.cache:cache_rm_command", "delete cached models and files and print what was freed"),
    "export": ("gptlab.weights.export:export_command", "export a model (Hugging Face dir, GGUF file, Ollama)"),
    "finetune classify": ("gptlab.finetune.classify:classify_command", "fine-tune a classifier (e.g. SMS spam)"),
    "finetune instruct": ("gptlab.finetune.instruct:instruct_command", "instruction fine-tuning"),
    "classify": ("gptlab.finetune.classify:predict_command", "classify a text with a fine-tuned classifier"),
    "distill": ("gptlab.finetune.distill:distill_command", "knowledge distillation from a teacher model"),
    "judge": ("gptlab.evaluation.judge:judge_command", "score model responses with an LLM judge"),
    "fit": ("gptlab.fit.commands:fit_command", "will a model fit here, and how fast will it run"),
    "serve": ("gptlab.serve.commands:serve_command", "serve a model over the OpenAI and Ollama HTTP APIs"),
    "bench ladder": ("gptlab.training.ladder:ladder_command", "the course's training-speed ladder, rung by rung"),
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
    message = pattern.sub(lambda m: dashed(fields.get(m.group(1), m.group(1))) + " ", message)
    # a message that already names a flag but spells it the Python way: --allowed_special
    return _UNDERSCORED_FLAG.sub(lambda m: dashed(m.group(1)) if m.group(1) in params else m.group(0), message)


_UNDERSCORED_FLAG = re.compile(r"--([a-z0-9]+(?:_[a-z0-9]+)+)")


# ModelConfig field -> the flag that sets it, where the two names differ
_FIELD_FLAGS = {"drop_rate": "dropout"}


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
    from gptlab.errors import GptlabError

    func = None
    try:
        func = getattr(importlib.import_module(module), func_name)
        # a settings command (training.settings.command) fills its own defaults and is told only what was given
        result = func(**parse(func, rest, prog=f"gptlab {name}", fill=not getattr(func, "given_only", False)))
    except GptlabError as e:
        text = re.sub(r"\s*\n\s*", " ", str(e).strip())  # one line, whatever the message held
        print(f"error: {_flag_names(text, func) if func is not None else text}", file=sys.stderr)
        return 1
    except UsageError as e:
        print(f"error: {name}: {e.message()}; see gptlab {name} --help", file=sys.stderr)
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
