"""The ``gptlab`` command line: one table of commands, each a typed function.

Every command is a plain Python function elsewhere in the package; its
signature is the command's flags and its docstring is the ``--help`` text
(jsonargparse builds the parser). Any command also reads ``--config FILE.yaml``
with the same keys, and flags given after it override the file.

Only the chosen command's module is imported, so ``gptlab --help`` is fast.
A :class:`gptlab.errors.GptlabError` is printed as one line and exits 1.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> ("module:function", one-line summary shown by `gptlab --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("gptlab.training.commands:train", "pretrain (or continue) a model on a corpus"),
    "generate": ("gptlab.generation:generate_command", "generate text from a model"),
    "chat": ("gptlab.chat:chat_command", "chat with a model interactively"),
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


def run(argv: list[str]) -> int:
    """Run one command line; returns the exit status."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from gptlab import __version__

        print(__version__)
        return 0
    name, rest = _resolve(argv)
    if not name:
        groups = sorted({n.split()[0] for n in COMMANDS if " " in n})
        hint = f" (subcommands: {', '.join(n for n in COMMANDS if n.startswith(argv[0] + ' '))})" if argv[0] in groups else ""
        print(f"error: unknown command {argv[0]!r}{hint}; run `gptlab --help` for the list", file=sys.stderr)
        return 2
    target, _summary = COMMANDS[name]
    module, func_name = target.split(":")
    from jsonargparse import CLI

    from gptlab.errors import GptlabError

    try:
        func = getattr(importlib.import_module(module), func_name)
        result = CLI(func, args=rest, prog=f"gptlab {name}", as_positional=True,
                     fail_untyped=False, env_prefix="GPTLAB", default_env=False)
    except GptlabError as e:
        print(f"error: {e}", file=sys.stderr)
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
