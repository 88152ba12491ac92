"""The net for bad input: every command of the CLI, fed each class of bad input.

For each command the cases are generated from its signature (the same one the
parser reads), so a new command or flag is covered without a line here:

- an unknown flag, a missing required value;
- a value of the wrong type for every int/float flag;
- an out-of-range value (negative) for every int/float flag that counts something;
- for every flag that names a file or directory: a missing path, an empty file,
  a directory, a corrupt file (random bytes);
- the wrong kind of directory (a training run where a model or a file is expected);
- a concurrent writer on a run directory.

Each must end with exactly one ``error:`` line on stderr (no traceback), a
non-zero exit, and leave an existing run directory byte-identical (hashed
before and after every case). Values a flag legitimately accepts (a seed may be
negative) are listed in ACCEPTS with the reason, never silently dropped.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import signal
from pathlib import Path

import pytest
from paths import SHARED

from gptlab.cli import COMMANDS, run
from gptlab.cli_parser import params_of

VERDICT = Path(SHARED) / "the-verdict.txt"
SMS = Path(SHARED) / "SMSSpamCollection.tsv"
INSTRUCTIONS = Path(SHARED) / "instruction-data.json"
pytestmark = pytest.mark.skipif(not (VERDICT.exists() and SMS.exists() and INSTRUCTIONS.exists()),
                                reason="shared/data not found")

# A valid, quick command line per command ({RUN}: a trained tiny run, {TMP}: a fresh directory). A case
# changes one flag of it, so a bad value that is accepted shows up as a command that ran, not as a hang.
BASE = {
    "train": "--data {VERDICT} --preset gpt2-nano --vocab-size 300 --max-steps 1 --eval-every 1 --eval-iters 1 "
             "--batch-size 2 --progress false --out {TMP}/new",
    "generate": "--model {RUN} --prompt hi --max-new-tokens 2 --stream false",
    "chat": "--model {RUN} --max-new-tokens 2 --style alpaca",
    "eval": "--model {RUN} --data {VERDICT} --max-tokens 200",
    "prepare": "--data {VERDICT} --tokenizer {RUN} --out {TMP}/prep --progress false",
    "tokenizer train": "--data {VERDICT} --vocab-size 300 --out {TMP}/tok",
    "tokenizer encode": "--text hello --tokenizer {RUN}",
    "inspect": "--model {RUN}",
    "download": "--repo-id owner/name --cache-dir {TMP}/cache",
    "export": "--model {RUN} --out {TMP}/exp",
    "cache": "",
    "cache rm": "--older-than 100000d --dry-run",  # matches nothing, deletes nothing
    "finetune classify": "--model {RUN} --data {SMS} --limit 40 --max-steps 1 --batch-size 4 --eval-iters 1 "
                         "--max-length 16 --progress false --out {TMP}/cls",
    "finetune instruct": "--model {RUN} --data {INSTRUCTIONS} --max-steps 1 --batch-size 2 --eval-iters 1 "
                         "--max-test 1 --max-new-tokens 2 --allowed-max-length 32 --trainable last-1 --progress false --out {TMP}/ins",
    "classify": "--model {RUN} --text hello",
    "distill": "--teacher {RUN} --student gpt2-nano --data {VERDICT} --max-steps 1 --batch-size 2 --eval-every 1 "
               "--eval-iters 1 --context-length 16 --progress false --out {TMP}/dis",
    "judge": "--responses {TMP}/responses.json --judge http://127.0.0.1:9/ --retries 0 --progress false",
    "fit": "--model gpt2-nano",
    "serve": "--model {RUN} --port 0 --style alpaca",
    "bench ladder": "--device cpu --steps 1 --layers 1 --dim 32 --heads 2 --context 16 --batch 2 --big-batch 2 "
                    "--compile false",
}
# Flags that name a path the command reads (files or directories).
READS = {"data", "model", "tokenizer", "responses", "resume", "teacher", "student", "weight"}
# (command, flag, value) a command rightly accepts, with the reason.
ACCEPTS = {
    ("*", "seed", "-3"): "any integer seeds the generator",
    ("fit", "model", "missing"): "fit --model also searches the catalogue by name",
}
SKIP_FLAGS = {"help", "config", "print_config", "progress", "stream", "as_json", "json", "tui", "calibrate",
              "overwrite", "verify"}


def _func(name: str):
    module, fn = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), fn)


def _numeric(hint) -> str | None:
    text = str(hint)
    if "float" in text:
        return "float"
    if "int" in text and "list" not in text and "bool" not in text:
        return "int"
    return None


def _cases() -> list[tuple[str, str, str, str]]:
    """(command, flag, kind of bad input, value) for every command and flag."""
    cases = []
    for name in COMMANDS:
        cases.append((name, "bogus", "unknown flag", "1"))
        for flag, p in params_of(_func(name)).items():
            if flag in SKIP_FLAGS:
                continue
            kind = _numeric(p.hint)
            if kind is not None:
                cases.append((name, flag, "wrong type", "abc"))
                cases.append((name, flag, "out of range", "-3" if kind == "int" else "-1.5"))
            if flag in READS:
                for bad in ("missing", "empty file", "directory", "corrupt file"):
                    cases.append((name, flag, bad, bad))
    return [c for c in cases if (c[0], c[1], c[3]) not in ACCEPTS and ("*", c[1], c[3]) not in ACCEPTS]


CASES = _cases()


def _hash(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        h.update(str(p.relative_to(d)).encode())
        if p.is_file() and p.name != ".lock":
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("net") / "run"
    assert run(["train", "--data", str(VERDICT), "--preset", "gpt2-nano", "--vocab-size", "300", "--max-steps", "4",
                "--eval-every", "2", "--eval-iters", "1", "--batch-size", "2", "--progress", "false",
                "--out", str(out)]) == 0
    return out


def _bad_path(kind: str, tmp: Path) -> str:
    p = tmp / f"bad-{kind.replace(' ', '-')}"
    if kind == "empty file":
        p.write_bytes(b"")
    elif kind == "directory":
        p.mkdir()
    elif kind == "corrupt file":
        p.write_bytes(os.urandom(300))
    return str(p)


def _argv(name: str, flag: str, kind: str, value: str, run_dir: Path, tmp: Path) -> list[str]:
    base = BASE[name].format(RUN=run_dir, TMP=tmp, VERDICT=VERDICT, SMS=SMS, INSTRUCTIONS=INSTRUCTIONS).split()
    dashed = "--" + flag.replace("_", "-")
    if dashed in base:  # the case replaces the base value of that flag
        i = base.index(dashed)
        del base[i:i + 2]
    if kind in ("missing", "empty file", "directory", "corrupt file"):
        value = _bad_path(kind, tmp)
    return name.split() + base + [dashed, value]


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


@pytest.mark.parametrize("name,flag,kind,value", CASES, ids=[f"{c[0]}:{c[1]}:{c[2]}" for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(name, flag, kind, value, trained, tmp_path, capsys,
                                                  monkeypatch):
    monkeypatch.setattr("sys.stdin", open(os.devnull))  # chat reads its turns from stdin
    before = _hash(trained)
    argv = _argv(name, flag, kind, value, trained, tmp_path)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        code = run(argv)
    except _Hang:
        pytest.fail(f"gptlab {' '.join(argv)}: still running after 60 s (the bad value was accepted)")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error:")]
    assert code != 0, f"gptlab {' '.join(argv)} accepted {kind} {value!r} for --{flag} (exit 0)"
    assert "Traceback" not in "\n".join(err), err
    assert len(errors) == 1, err
    assert _hash(trained) == before, f"gptlab {' '.join(argv)} changed the run directory"


# ---- concurrent writers and the wrong kind of directory, for the commands that write runs ----

WRITERS = ["train", "finetune classify", "finetune instruct", "distill"]


@pytest.mark.parametrize("name", WRITERS)
def test_a_run_held_by_another_writer_is_refused(name, trained, tmp_path, capsys):
    from gptlab.training.rundir import lock_run

    fd = lock_run(trained)
    try:
        before = _hash(trained)
        argv = _argv(name, "out", "concurrent", str(trained), trained, tmp_path) + ["--overwrite", "true"]
        code = run(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and f"pid {os.getpid()}" in err[0], err
        assert _hash(trained) == before
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", WRITERS[1:])
def test_resuming_a_run_of_another_kind_is_refused(name, trained, tmp_path, capsys):
    before = _hash(trained)
    code = run(_argv(name, "resume", "wrong kind", str(trained), trained, tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "gptlab train" in err[0], err  # names the command that made it
    assert _hash(trained) == before


def test_the_net_is_wide():
    """Every command is in BASE, and the net holds a few hundred cases."""
    assert set(BASE) == set(COMMANDS)
    assert len(CASES) > 300


@pytest.mark.parametrize("name", sorted(set(BASE) - {"download", "judge", "classify", "serve"}))
def test_each_base_command_line_works(name, trained, tmp_path, capsys, monkeypatch):
    """The control: the valid command line every case starts from runs (exit 0), so a case's error is the bad
    value's, not the base's. (download needs the network, judge a judge server, classify a classifier; serve
    runs until a signal stops it: tests/serve/test_server.py starts it, sends SIGTERM and checks exit 0.)"""
    monkeypatch.setattr("sys.stdin", open(os.devnull))
    base = BASE[name].format(RUN=trained, TMP=tmp_path, VERDICT=VERDICT, SMS=SMS, INSTRUCTIONS=INSTRUCTIONS).split()
    code = run(name.split() + base)
    assert code == 0, capsys.readouterr().err
