"""The command-line parser: a command function's signature, type hints and docstring are its flags.

:func:`parse` turns the words after ``gptlab COMMAND`` into the keyword
arguments of the command function, in one pass over argv:

- ``--max-steps 5``, ``--max-steps=5`` and ``--max_steps 5`` set ``max_steps``;
- the required parameters may also be given as bare words, in order
  (``gptlab inspect gpt2-124m`` = ``gptlab inspect --model gpt2-124m``);
- a boolean flag alone means true (``--compile`` = ``--compile true``);
- a list flag repeats or takes commas (``--add a --add b,c``, or a JSON list);
- ``X | None`` accepts ``null`` for None; ``Literal[...]`` restricts the values;
- ``--config FILE.yaml`` sets the same keys (underscored) at its place in argv,
  so flags after it override the file.

Bad input raises :class:`UsageError`, which carries the kind of problem, the
parameter and the value; ``str()`` of it is the one line the CLI prints.

The parameters are read from ``inspect.signature`` (which honours a
synthesized ``__signature__``) and ``typing.get_type_hints``, falling back to
the signature's own annotations; per-flag help comes from the docstring's
Google-style ``Args:`` section.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import os
import re
import shutil
import textwrap
import types
import typing
from dataclasses import dataclass, field

_TRUE, _FALSE = {"true", "yes", "on"}, {"false", "no", "off"}
# words a bare boolean flag takes as its value; 1 and 0 are taken but refused
_BOOL_WORDS = _TRUE | _FALSE | {"1", "0"}
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")

# what is wrong with a command line (UsageError.kind)
Kind = typing.Literal["unknown_flag", "bad_value", "needs_value", "missing", "unexpected", "config_file",
                      "config_yaml", "config_not_mapping", "config_key", "config_dashed_key"]


class UsageError(Exception):
    """The command line does not fit the command's signature (exit status 2).

    ``kind`` is one of: ``unknown_flag`` (``flags``), ``bad_value`` (``name``,
    ``value``, ``hint``), ``needs_value`` (``name``), ``missing`` (``names``),
    ``unexpected`` (``words``, ``names`` still free), ``config_file`` (``path``),
    ``config_yaml`` (``detail``), ``config_not_mapping`` (``value``),
    ``config_key`` (``key``, ``suggestion``), ``config_dashed_key`` (``key``).
    """

    def __init__(self, kind: Kind, *, name: str = "", value: object = None, hint: object = None,
                 names: tuple[str, ...] = (), words: tuple[str, ...] = (), flags: tuple[str, ...] = (),
                 suggestion: str = "", key: str = "", path: str = "", detail: str = ""):
        self.kind, self.name, self.value, self.hint = kind, name, value, hint
        self.names, self.words, self.flags, self.suggestion = names, words, flags, suggestion
        self.key, self.path, self.detail = key, path, detail
        super().__init__(self.message())

    def message(self) -> str:
        """One line naming the flags as the user types them (``--top-k``)."""
        k = self.kind
        if k == "unknown_flag":
            hint = f" (did you mean {self.suggestion}?)" if self.suggestion else ""
            return f"unknown flag{'s' if len(self.flags) > 1 else ''} {' '.join(self.flags)}{hint}"
        if k == "bad_value":
            return f"{dashed(self.name)} expects {describe(self.hint)}, got {self.value!r}"
        if k == "needs_value":
            return f"{dashed(self.name)} needs a value"
        if k == "missing":
            return "missing " + ", ".join(f"{dashed(n)} {n.upper()}" for n in self.names)
        if k == "unexpected":
            expected = f" (expected: {', '.join(self.names).upper()})" if self.names else ""
            return f"unexpected argument(s): {' '.join(self.words)}{expected}"
        if k == "config_file":
            return f"--config: {self.detail}: {self.path!r}"
        if k == "config_yaml":
            return f"the --config file is not valid YAML ({self.detail})"
        if k == "config_not_mapping":
            return ("the --config file must hold a YAML mapping of flag names to values (max_steps: 100), "
                    f"got {self.value!r}")
        if k == "config_dashed_key":
            return (f"the --config file has the key {self.key!r}; write it {self.key.replace('-', '_')} "
                    "(keys are the flag names with underscores)")
        if k == "config_key":
            hint = f" (did you mean {self.suggestion}?)" if self.suggestion else ""
            return f"unknown key {self.key!r} in the --config file{hint}"
        return k


def dashed(name: str) -> str:
    """The flag a parameter is typed as: ``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


@dataclass
class Param:
    """One flag: a parameter of the command function."""

    name: str
    hint: object  # the type hint (str when none is given or it cannot be resolved)
    default: object = inspect.Parameter.empty
    help: str = ""
    kind: str = field(init=False)  # "bool", "list" or "value"
    item: object = field(init=False)  # the type a value is converted to (a list's item type)
    nullable: bool = field(init=False)
    positional: bool = False  # an optional parameter a bare word may fill (named in the function's ``positional``)

    def __post_init__(self):
        args = typing.get_args(self.hint)
        self.nullable = _is_union(self.hint) and type(None) in args
        base = _strip_none(self.hint)
        if typing.get_origin(base) is list:
            self.kind, self.item = "list", (typing.get_args(base) or (str,))[0]
        else:
            self.kind, self.item = ("bool" if base is bool else "value"), base

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _strip_none(hint):
    """``X | None`` -> ``X`` (None is then the default, or typed as ``null``)."""
    if _is_union(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def describe(hint) -> str:
    """What a flag of this type expects, in words (``int | None`` -> 'an integer')."""
    hint = _strip_none(hint)
    if typing.get_origin(hint) is list:
        return "a list (repeat the flag or separate values with commas)"
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(
        hint, str(hint).replace("typing.", ""))


def params_of(func) -> dict[str, Param]:
    """The command's flags, in signature order (``*args``/``**kwargs`` are not flags)."""
    sig = inspect.signature(func)  # honours a synthesized __signature__
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # an annotation that does not resolve: use the signature's own
        hints = {}
    helps = _doc_args(func.__doc__ or "")
    positional = set(getattr(func, "positional", ()))  # e.g. cache_rm_command.positional = ("pattern",)
    out = {}
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint = hints.get(name, p.annotation)
        if hint is inspect.Parameter.empty or isinstance(hint, str):  # untyped: like its default
            hint = type(p.default) if p.default not in (None, inspect.Parameter.empty) else str
        out[name] = Param(name, hint, p.default, helps.get(name, ""), positional=name in positional)
    return out


def description(func) -> str:
    """The docstring before its ``Args:`` section."""
    text = inspect.cleandoc(func.__doc__ or "")
    return re.split(r"^\s*(?:Args|Arguments|Parameters):\s*$", text, maxsplit=1, flags=re.M)[0].strip()


def _doc_args(doc: str) -> dict[str, str]:
    """Google-style ``Args:`` entries: ``name: text`` with indented continuation lines."""
    lines = inspect.cleandoc(doc).splitlines()
    start = next((i for i, ln in enumerate(lines) if re.match(r"^\s*(Args|Arguments|Parameters):\s*$", ln)), None)
    if start is None:
        return {}
    helps: dict[str, str] = {}
    indent, current = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent or width == 0:
            break  # the next section (Returns:, Raises:, ...)
        m = re.match(r"\s*\**(\w+)\s*(?:\([^)]*\))?:\s*(.*)$", line)
        if width == indent and m:
            current = m.group(1)
            helps[current] = m.group(2)
        elif current:
            helps[current] += " " + line.strip()
    return helps


def _looks_like_flag(word: str) -> bool:
    """Whether a word is a flag rather than a value (argparse's rule: -1 and '- x' are values)."""
    return (word.startswith("-") and len(word) > 1 and not _NEGATIVE_NUMBER.match(word)
            and " " not in word)


def convert(p: Param, raw: str):
    """A typed word -> the parameter's value; UsageError(bad_value) when it is not one."""
    if p.nullable and raw == "null":
        return None
    if p.kind == "list":
        if raw.startswith("["):
            try:
                items = json.loads(raw)
            except ValueError:
                items = None
            if not isinstance(items, list):
                raise UsageError("bad_value", name=p.name, value=raw, hint=p.hint)
            return [_convert_one(p, item if isinstance(item, str) else json.dumps(item)) for item in items]
        return [_convert_one(p, v) for v in raw.split(",") if v]
    return _convert_one(p, raw)


def _convert_one(p: Param, raw: str):
    t = p.item
    if t is bool:
        if raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
    elif typing.get_origin(t) is typing.Literal:
        for choice in typing.get_args(t):
            if raw == str(choice):
                return choice
    elif t is float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return value
    elif t is typing.Any or t is object:
        return raw
    elif callable(t):
        try:
            return t(raw)
        except (TypeError, ValueError):
            pass
    raise UsageError("bad_value", name=p.name, value=raw, hint=p.item if p.kind == "list" else p.hint)  # a list: say what each item must be


def from_config(p: Param, value):
    """A value read from the --config YAML file -> the parameter's value (YAML already typed it)."""
    if isinstance(value, str) and p.kind != "list":
        return convert(p, value)
    if p.kind == "list" and value is not None and not isinstance(value, list):  # `data: a.txt`: a list of one
        return [from_config(Param(p.name, p.item), value)]
    if value is None:  # `key: null` in the file, as jsonargparse took it: None even for `seed: int`
        return None
    if p.kind == "list" and isinstance(value, list):
        return [from_config(Param(p.name, p.item), v) for v in value]
    t = p.item
    ok = ((t is bool and isinstance(value, bool))
          or (t is int and isinstance(value, int) and not isinstance(value, bool))
          or (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
          or (typing.get_origin(t) is typing.Literal and value in typing.get_args(t)))
    if not ok:
        raise UsageError("bad_value", name=p.name, value=str(value), hint=p.hint)
    return float(value) if t is float else value


def read_config(path: str, params: dict[str, Param]) -> dict[str, object]:
    """The --config file's values, typed; UsageError(config_*) for the file's own problems."""
    import yaml  # only when a --config is given: keeps `gptlab --help` fast

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError("config_file", path=path, detail="file does not exist") from None
    except OSError as e:
        raise UsageError("config_file", path=path, detail=f"cannot read the file ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise UsageError("config_yaml", detail=" ".join(str(e).split())) from None
    if not isinstance(data, dict):
        first = text.strip().splitlines()[0] if text.strip() else ""
        raise UsageError("config_not_mapping", value=first)
    values = {}
    for key, value in data.items():
        key = str(key)
        if key == "config":  # a file may include another (config: base.yaml), relative to this one
            values.update(read_config(os.path.join(os.path.dirname(path), str(value)), params))
            continue
        if key not in params:
            if key.replace("-", "_") in params:  # the flag's spelling used as a key: max-steps
                raise UsageError("config_dashed_key", key=key)
            close = difflib.get_close_matches(key.replace("-", "_"), list(params), n=1)
            raise UsageError("config_key", key=key, suggestion=close[0] if close else "")
        values[key] = from_config(params[key], value)
    return values


def parse(func, args: list[str], prog: str, *, fill: bool = True) -> dict[str, object]:
    """The keyword arguments that ``args`` give ``func``: every parameter, defaults filled in, or with
    ``fill=False`` only those a flag, a bare word or ``--config`` set (so ``func`` can tell a setting
    given at its default from one left out, as ``--resume`` must).

    ``-h``/``--help`` prints the help and ``--print-config`` the settings as
    YAML; both then raise ``SystemExit(0)``, as argparse does.
    """
    params = params_of(func)
    if any(a in ("-h", "--help") for a in args):
        print(format_help(func, prog, params))
        raise SystemExit(0)
    values: dict[str, object] = {}
    flagged: set[str] = set()  # set by a flag (not by --config): bare words fill the others
    bare: list[str] = []
    after_bool: dict[int, str] = {}  # bare word index -> the bare boolean flag it follows (--compile maybe)
    unknown: list[str] = []
    print_config = False
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if not (word.startswith("--") and len(word) > 2):
            if _looks_like_flag(word) and word != "--":
                unknown.append(word)
            else:
                bare.append(word)
            continue
        key, eq, raw = word[2:].partition("=")
        name = key.replace("-", "_")
        if name == "print_config":
            print_config = True
            continue
        p = params.get(name)
        if p is None and name != "config":
            unknown.append(dashed(key))
            if not eq and i < len(args) and not _looks_like_flag(args[i]):
                i += 1  # its value
            continue
        if not eq:
            if p is not None and p.kind == "bool":  # a bare boolean flag means true
                take = i < len(args) and args[i].lower() in _BOOL_WORDS
            elif p is not None and p.kind == "list" and (i >= len(args) or _looks_like_flag(args[i])):
                take = False  # a list flag alone: the empty list
            elif i >= len(args) or _looks_like_flag(args[i]):
                raise UsageError("needs_value", name=name)
            else:
                take = True
            raw = args[i] if take else ("true" if p is not None and p.kind == "bool" else "")
            i += take
            if p is not None and p.kind == "bool" and not take:
                after_bool[len(bare)] = name
        if p is None:  # --config FILE.yaml: its keys, at this place in argv
            values.update(read_config(raw, params))
        elif p.kind == "list" and name in flagged and not raw.startswith("["):
            values[name] = [*values[name], *convert(p, raw)]  # a list flag repeats
        else:
            values[name] = convert(p, raw)
        if p is not None:
            flagged.add(name)
    _fill(params, values, flagged, bare, unknown, after_bool)
    kwargs = {n: values.get(n, p.default) for n, p in params.items()}
    if print_config:
        import yaml

        print(yaml.safe_dump(kwargs, sort_keys=False).rstrip())
        raise SystemExit(0)
    return kwargs if fill else {n: v for n, v in kwargs.items() if n in values}


def _fill(params: dict[str, Param], values: dict, flagged: set[str], bare: list[str], unknown: list[str],
          after_bool: dict[int, str] | None = None) -> None:
    """Bare words fill the required parameters not given as flags; then what is still wrong."""
    if unknown:
        known = [dashed(n) for n in params] + ["--config"]
        close = difflib.get_close_matches(unknown[0], known, n=1)
        raise UsageError("unknown_flag", flags=tuple(unknown), suggestion=close[0] if close else "")
    free = [n for n, p in params.items() if (p.required or p.positional) and n not in flagged]
    if len(bare) > len(free):
        for i in range(len(free), len(bare)):  # a word left over right after a boolean flag was meant as its value
            if i in (after_bool or {}):
                flag = params[after_bool[i]]
                raise UsageError("bad_value", name=flag.name, value=bare[i], hint=flag.hint)
        raise UsageError("unexpected", words=tuple(bare[len(free):]), names=tuple(free))
    for name, word in zip(free, bare):
        values[name] = convert(params[name], word)
    if missing := tuple(n for n, p in params.items() if p.required and n not in values):
        raise UsageError("missing", names=missing)


def format_help(func, prog: str, params: dict[str, Param] | None = None) -> str:
    """``gptlab COMMAND --help``: usage, the docstring, then every flag with its help."""
    params = params_of(func) if params is None else params
    width = max(40, min(shutil.get_terminal_size((100, 24)).columns, 100) - 2)
    required = [p for p in params.values() if p.required]
    words = [p.name.upper() if p.required else f"[{p.name.upper()}]" for p in params.values()
             if p.required or p.positional]
    lines = [f"usage: {prog} {' '.join(words)} [flags]".replace("  ", " ")]
    if text := description(func):
        lines += ["", "\n\n".join(textwrap.fill(par, width) for par in text.split("\n\n"))]
    rows = []
    for p in params.values():
        metavar = {"bool": "[true|false]", "list": f"{p.name.upper()}[,...]"}.get(p.kind, p.name.upper())
        if typing.get_origin(p.item) is typing.Literal:
            metavar = "{" + ",".join(map(str, typing.get_args(p.item))) + "}"
        left = (f"{p.name.upper()}, {dashed(p.name)} {metavar}" if p.required or p.positional
                else f"{dashed(p.name)} {metavar}")
        kind = str(p.hint).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("None", "null")
        shown = "null" if p.default is None else str(p.default).lower() if p.kind == "bool" else p.default
        what = "required" if p.required else f"default: {shown}"
        rows.append((left, f"{p.help} ({what}; type: {kind})".strip()))
    rows += [("--config FILE.yaml", "read flags from a YAML file (keys as in max_steps: 100); "
                                    "flags after it override the file"),
             ("--print-config", "print the settings as YAML and exit"),
             ("-h, --help", "show this help and exit")]
    lines += ["", "flags (required ones may also be given as bare words, in order):" if required else "flags:"]
    col = min(30, max(len(left) for left, _ in rows) + 4)
    for left, text in rows:
        body = textwrap.wrap(text, width - col) or [""]
        if len(left) + 4 > col:
            lines += [f"  {left}"] + [" " * col + b for b in body]
        else:
            lines += [f"  {left.ljust(col - 2)}{body[0]}"] + [" " * col + b for b in body[1:]]
    return "\n".join(lines)
