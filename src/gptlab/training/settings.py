"""Run settings as data: one dataclass per recipe, whose field docs are the CLI help.

A recipe declares its settings once, as a dataclass whose docstring has an ``Attributes:`` section (one
line per field, continuation lines indented). From it:

- :func:`command` makes the CLI command: a function whose ``__signature__``, type hints and ``__doc__``
  (an ``Args:`` section) are the fields, so ``gptlab.cli`` builds the flags and ``--help`` from it as
  from any typed function;
- :func:`api` makes the Python function (``gptlab.train``, ``finetune_classifier``, ...) with the same
  keywords and defaults;
- :func:`refuse_changed` is the one resume rule: with ``--resume`` every setting comes from the run,
  and one given differently is refused, naming it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

from gptlab.errors import GptlabError
from gptlab.training.loggers import LoggerName

# Settings that may differ on --resume: how and where this process runs (the limits are per recipe).
PER_PROCESS = {"device", "progress", "out", "resume", "overwrite", "logger", "nproc", "nnodes", "rdzv_endpoint",
               "strategy", "activation_checkpointing", "flush_denormals"}


@dataclass
class RunSettings:
    """What every recipe's command takes.

    Attributes:
        out: run directory to create.
        resume: continue the run in this directory from its latest checkpoint, with the settings it was
            started with (only the stopping limit, the new total, may change).
        precision: auto (bf16 where fast), fp32, bf16 or fp16.
        device: auto, cpu, cuda, cuda:N, mps, or a MIG slice: mig:N or mig:UUID (sets CUDA_VISIBLE_DEVICES).
        seed: random seed.
        overwrite: replace an existing run in --out (everything is checked first; the old run is replaced
            only once the new one is set up).
        progress: show a progress bar.
        logger: also log each evaluation to csv (RUN/metrics.csv), tensorboard (RUN/tensorboard/) and/or
            wandb (offline without an API key); repeat the flag or separate with commas. On --resume give it again.
        nproc: processes per node: more than 1 starts torch.distributed.run (torchrun) with this many
            workers (one per GPU on CUDA); --batch-size is then per process. See docs/distributed.md.
        nnodes: nodes of a multi-node run (with --rdzv-endpoint), as torchrun takes it (e.g. 2, or 1:4).
        rdzv_endpoint: HOST:PORT where the nodes of a multi-node run meet (torchrun's --rdzv-endpoint).
        strategy: auto (ddp with several processes), ddp (every process holds the whole model) or fsdp
            (FSDP2: parameters, gradients and optimizer state sharded across processes).
        activation_checkpointing: recompute each block's activations in backward (less memory, about one
            more forward pass per step).
        flush_denormals: on a CPU, treat floats below 2^-126 as zero while training (their microcode
            assists slow a step down as the model learns: docs/training-speed.md); false keeps IEEE denormals.
    """

    out: str = "runs/default"
    resume: str | None = None
    precision: str = "auto"
    device: str = "auto"
    seed: int = 123
    overwrite: bool = False
    progress: bool = True
    logger: list[LoggerName] = dataclasses.field(default_factory=list)
    nproc: int = 1
    nnodes: str = "1"
    rdzv_endpoint: str | None = None
    strategy: str = "auto"
    activation_checkpointing: bool = False
    flush_denormals: bool = True

    # Settings that count or scale something: refused unless > 0 (None, "not set", is fine).
    POSITIVE: ClassVar[tuple[str, ...]] = ()

    def check_positive(self) -> None:
        """One line naming the first setting in ``POSITIVE`` that is zero or negative."""
        for name in self.POSITIVE:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise GptlabError(f"{flag_name(name)} {value} must be > 0")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its help text, from the ``Attributes:`` sections along ``cls``'s MRO (nearest wins)
    and from ``field(metadata={"help": ...})``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        text = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
        section = re.search(r"^Attributes:\n((?:[ \t]+.*\n?|\n)*)", text, re.M)
        if section:
            for m in re.finditer(r"^    (\w+): (.*(?:\n {8,}.*)*)", section.group(1), re.M):
                docs[m.group(1)] = re.sub(r"\s*\n\s*", " ", m.group(2)).strip()
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            docs[f.name] = f.metadata["help"]
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return inspect.Parameter.empty


def defaults(cls: type) -> dict[str, Any]:
    """Field name -> its default value."""
    return {f.name: _default(f) for f in dataclasses.fields(cls)}


def _summary(cls: type) -> str:
    """The class docstring without its Attributes section: the command's description."""
    text = inspect.cleandoc(cls.__doc__ or "")
    return re.split(r"^Attributes:\n", text, flags=re.M)[0].rstrip()


def _signature(cls: type, positional: Iterable[str] = ()) -> tuple[inspect.Signature, dict[str, Any]]:
    hints = typing.get_type_hints(cls)
    positional = list(positional)
    kinds = {n: inspect.Parameter.POSITIONAL_OR_KEYWORD for n in positional}
    base = {f.name for f in dataclasses.fields(RunSettings)}  # the shared flags come after the recipe's own
    fields = sorted(dataclasses.fields(cls), key=lambda f: positional.index(f.name) if f.name in positional
                    else len(positional) + (f.name in base))
    params = [inspect.Parameter(f.name, kinds.get(f.name, inspect.Parameter.KEYWORD_ONLY if positional else
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD),
                                default=_default(f), annotation=hints[f.name]) for f in fields]
    return inspect.Signature(params), {p.name: p.annotation for p in params}


def _describe(func: Callable, cls: type, summary: str, returns: Any, positional: Iterable[str] = ()) -> Callable:
    sig, annotations = _signature(cls, positional)
    func.__signature__ = sig.replace(return_annotation=returns)  # type: ignore[attr-defined]
    func.__annotations__ = {**annotations, "return": returns}
    docs = field_docs(cls)
    args = "".join(f"    {name}: {docs.get(name, name.replace('_', ' '))}\n" for name in sig.parameters)
    func.__doc__ = f"{summary}\n\nArgs:\n{args}"
    return func


def command(cls: type, run: Callable[[Any], Any], *, name: str) -> Callable[..., int]:
    """The CLI command of settings class ``cls``: keyword flags from its fields, help from their docs.

    ``run(settings)`` does the work; the command returns its value when that is an exit status (an int)
    and 0 otherwise.
    """

    def cmd(**kwargs) -> int:
        result = run(given(cls(**kwargs), kwargs))
        return result if isinstance(result, int) and not isinstance(result, bool) else 0

    cmd.__name__ = cmd.__qualname__ = name
    cmd.given_only = True  # type: ignore[attr-defined]  # the CLI passes only the flags given (see given())
    return _describe(cmd, cls, _summary(cls), int)


def api(cls: type, run: Callable[..., Any], *, name: str, positional: Iterable[str] = (),
        summary: str | None = None, returns: Any = Any) -> Callable[..., Any]:
    """The Python function of settings class ``cls``: ``positional`` fields first, the rest keywords."""
    order = list(positional)

    def fn(*args, **kwargs):
        if len(args) > len(order):
            raise TypeError(f"{name}() takes {len(order)} positional arguments but {len(args)} were given")
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in defaults(cls)}
        values = dict(zip(order, args)) | kwargs
        if any(isinstance(values.get(k), Path) for k in values):
            values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
        return run(given(cls(**values), values), **extra)

    fn.__name__ = fn.__qualname__ = name
    return _describe(fn, cls, summary or _summary(cls), returns, order)


def given(s: Any, names: Iterable[str]) -> Any:
    """``s``, remembering which of its settings were given (the CLI's flags and ``--config`` keys, the API's
    keywords): on ``--resume`` a setting given at its default still counts as given."""
    object.__setattr__(s, "_given", frozenset(names))
    return s


def given_names(s: Any) -> frozenset[str] | None:
    """The settings given for ``s`` (see :func:`given`); None where not known (``s`` built directly)."""
    return getattr(s, "_given", None)


def train_config_from(s: Any, **overrides):
    """The :class:`TrainConfig` of settings ``s``: every field the two share, then ``overrides``."""
    from gptlab.training.loop import TrainConfig

    values = {f.name: getattr(s, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(s, f.name)}
    return TrainConfig(**(values | overrides))


# ---- resuming -----------------------------------------------------------------------------------

def recorded_ref(ref: str | Path | None, keep: Iterable[str] = ()) -> str | None:
    """``ref`` as a run records it for ``--resume``: an existing local path made absolute, so the run
    resumes from any working directory; anything else (a Hub repo id, a preset, a ``pkg:`` reference,
    one of the names in ``keep``) as typed."""
    if ref is None:
        return None
    if isinstance(ref, (list, tuple)):  # a data mixture: each source
        return [recorded_ref(r, keep) for r in ref]  # type: ignore[misc]
    text = str(ref)
    if not text or text.startswith("pkg:") or text in set(keep):
        return text
    path = Path(text).expanduser()
    head, colon, weight = text.rpartition(":")
    if not path.exists() and colon and Path(head).expanduser().exists():  # a weighted source, PATH:WEIGHT
        return f"{Path(head).expanduser().resolve()}:{weight}"
    return str(path.resolve()) if path.exists() else text


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def refuse_changed(s: Any, meta: dict, run: Path, limits: Iterable[str], refs: dict[str, Iterable[str]]) -> None:
    """The one resume rule: every setting but the stopping ``limits`` comes from the run; refuse one given
    differently. Which settings were given is known from the CLI's flags and the API's keywords (see
    :func:`given`), a setting given at its default included; for settings built directly, one left at
    its default counts as not given. None or empty counts as not given. The references in ``refs``
    (name -> names kept as typed) are compared as the run records them (local paths absolute)."""
    recorded = {**meta["train"], **meta["settings"]}
    limits = list(limits)
    base, named = defaults(type(s)), given_names(s)
    for name, value in dataclasses.asdict(s).items():
        if name in PER_PROCESS or name in limits or name not in recorded:
            continue
        if value is None or value == "" or (name not in named if named is not None else value == base.get(name)):
            continue
        if name in refs:
            value = recorded_ref(value, refs[name])
        if value != recorded[name]:
            flag = flag_name(name)
            was = "default (not set)" if recorded[name] is None else repr(recorded[name])
            raise GptlabError(f"{flag} {value} differs from the {was} that {run} was started with; a "
                              f"resumed run keeps its settings (only {'/'.join(map(flag_name, limits))} may change): "
                              f"drop {flag}, or start a new run with --out")


def resumed_train_config(recorded: dict[str, Any], s: Any, limits: Iterable[str]):
    """The run's recorded :class:`TrainConfig` with only the stopping limits given in ``s`` replaced
    (``max_steps`` and ``epochs`` replace each other)."""
    from gptlab.training.loop import TrainConfig

    try:
        cfg = TrainConfig(**recorded)
    except TypeError as e:
        raise GptlabError(f"the recorded training settings do not fit this gptlab version ({e}); "
                          "the run cannot be resumed, start a new one with --out") from None
    for name in limits:
        value = getattr(s, name, None)
        if value is None:
            continue
        setattr(cfg, name, value)
        if name == "max_steps":
            cfg.epochs = None
        elif name == "epochs":
            cfg.max_steps = None
    cfg.validate()
    return cfg


def from_record(cls: type, meta: dict, s: Any):
    """Settings ``cls`` as a run recorded them (``meta["settings"]``), run by this process's ``s``: its
    device, progress bar and --resume path."""
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        recorded = cls(**{k: v for k, v in meta["settings"].items() if k in names})
    except (TypeError, AttributeError, KeyError) as e:
        raise GptlabError(f"the recorded settings do not fit this gptlab version ({e}); "
                          "the run cannot be resumed, start a new one with --out") from None
    own = {n: getattr(s, n) for n in PER_PROCESS if n in names and n != "out"}
    return dataclasses.replace(recorded, **own, out=str(s.resume))
