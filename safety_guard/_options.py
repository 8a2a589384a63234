"""Command-line options generated from dataclass fields, so that each default is stated once.

Each field becomes one ``argparse`` option whose help is the field's ``metadata["help"]``
followed by the dataclass default. Options that are not given are left out of the parsed
namespace (``default=argparse.SUPPRESS``), and :func:`given_options` hands back only those that
were, so the dataclass itself supplies every other default.

``transformers.HfArgumentParser`` reads the same metadata, but it cannot take these dataclasses:
it has no parser for ``Sequence[float]`` grids or nested dataclasses (``ParameterSelection``),
it gives every field a default in the namespace (so a context-dependent default such as
``--paper``'s 512 tokens cannot tell "not given" from "given"), and it passes ``%`` in help
texts to argparse unescaped.

Example:
    >>> import argparse
    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Config:
    ...     num_items: int = field(default=3, metadata={"help": "How many items."})
    >>> parser = argparse.ArgumentParser()
    >>> add_dataclass_options(parser, Config, prefix="config.")
    >>> given_options(parser.parse_args(["--num-items", "5"]), Config, prefix="config.")
    {'num_items': 5}
    >>> given_options(parser.parse_args([]), Config, prefix="config.")
    {}
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal

__all__ = ["add_const_option", "add_dataclass_options", "field_default", "given_options"]

_NONE_WORDS = ("none", "None")


def field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (calling its ``default_factory``).

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Config:
        ...     dims: int = 1
        >>> field_default(Config, "dims")
        1
    """
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default.")
    raise ValueError(f"{cls.__name__} has no field {name!r}.")


def _option_type(annotation: Any) -> tuple[Any, bool]:
    """``(type, optional)``: the annotation without ``| None``, and whether it allowed ``None``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return annotation, False


def _reporting(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """``convert`` whose ``ValueError`` message argparse shows (it hides a plain one's text)."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return parse


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text in _NONE_WORDS else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names it in its errors
    return parse


def add_dataclass_options(
    container: argparse.ArgumentParser | argparse._ActionsContainer,
    cls: type,
    *,
    prefix: str,
    flags: Mapping[str, Sequence[str]] | None = None,
    only: Collection[str] | None = None,
    skip: Collection[str] = (),
    parse: Mapping[str, Callable[[str], Any]] | None = None,
    show: Mapping[str, Callable[[Any], str]] | None = None,
    notes: Mapping[str, str] | None = None,
) -> None:
    """Add one option per field of dataclass ``cls`` to ``container`` (a parser or a group).

    Args:
        container: where the options go (``parser``, an argument group, a mutually exclusive
            group).
        cls: the dataclass; each field's ``metadata["help"]`` is its option's help.
        prefix: prepended to the field name to make the option's ``dest`` (keeps the fields of
            two dataclasses apart); :func:`given_options` takes the same prefix.
        flags: option strings of a field (default ``--field-name``); the first is shown first
            and names the value (``--grid GRID``).
        only: add just these fields; ``skip``: leave these out.
        parse: converter from the command-line text, for a field whose type is not ``int``,
            ``float``, ``str``, ``bool`` or a ``Literal`` (optionally ``| None``); the message of
            a ``ValueError`` it raises is the usage error argparse prints.
        show: how a field's default is written in the help (default: ``str``).
        notes: text added after the default in the help, e.g. how another option changes it
            (for a field whose default is ``None``, say what that default means).

    ``bool`` fields get ``--name/--no-name``; ``Literal`` fields their choices. A field typed
    ``X | None`` (not ``str``) also takes ``none``. A field whose default is ``None`` shows no
    default (its help says what ``None`` means).

    Raises:
        TypeError: a field's type has no converter (pass one in ``parse``).

    Example:
        >>> import argparse
        >>> from dataclasses import dataclass, field
        >>> @dataclass
        ... class Config:
        ...     mode: Literal["a", "b"] = field(default="a", metadata={"help": "The mode."})
        ...     fast: bool = field(default=True, metadata={"help": "Go fast."})
        >>> parser = argparse.ArgumentParser()
        >>> add_dataclass_options(parser, Config, prefix="c.", flags={"mode": ["--mode", "-m"]})
        >>> vars(parser.parse_args(["-m", "b", "--no-fast"]))
        {'c.mode': 'b', 'c.fast': False}
    """
    flags, parse, show, notes = flags or {}, parse or {}, show or {}, notes or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        kind, optional = _option_type(hints[f.name])
        option_strings = flags.get(f.name, [f"--{f.name.replace('_', '-')}"])
        metavar = option_strings[0].lstrip("-").replace("-", "_").upper()
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": argparse.SUPPRESS}
        if f.name in parse:
            kwargs["type"] = _reporting(parse[f.name])
            kwargs["metavar"] = metavar
        elif typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            kwargs["choices"] = choices
            kwargs["type"] = type(choices[0])
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float, str):
            kwargs["type"] = _none_or(kind) if optional and kind is not str else kind
            kwargs["metavar"] = metavar
        else:
            raise TypeError(
                f"{cls.__name__}.{f.name} has type {kind!r}, which has no command-line "
                f"converter: pass parse={{{f.name!r}: function}}."
            )
        default = field_default(cls, f.name)
        words = []
        if default is not None:
            words.append(f"default: {show.get(f.name, str)(default)}")
        if optional and kind not in (str, bool) and f.name not in parse:
            words.append("'none' for None")
        if f.name in notes:
            words.append(notes[f.name])
        text = f.metadata.get("help", "").rstrip()
        if words:
            text += f" ({'; '.join(words)})"
        kwargs["help"] = text.replace("%", "%%")
        container.add_argument(*option_strings, **kwargs)


def add_const_option(
    container: argparse.ArgumentParser | argparse._ActionsContainer,
    flag: str,
    *,
    prefix: str,
    name: str,
    value: Any,
    help: str,
) -> None:
    """A flag that sets field ``name`` to ``value``: a shorthand such as ``--plain-template``.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser()
        >>> add_const_option(parser, "--plain", prefix="c.", name="template", value="plain", help="")
        >>> vars(parser.parse_args(["--plain"]))
        {'c.template': 'plain'}
    """
    container.add_argument(
        flag,
        action="store_const",
        const=value,
        dest=prefix + name,
        default=argparse.SUPPRESS,
        help=help,
    )


def given_options(args: argparse.Namespace, cls: type, *, prefix: str) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line, as keyword arguments of ``cls``.

    Example:
        >>> import argparse
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Config:
        ...     seed: int = 0
        >>> given_options(argparse.Namespace(**{"c.seed": 3, "other": 1}), Config, prefix="c.")
        {'seed': 3}
    """
    names = {f.name for f in dataclasses.fields(cls)}
    return {
        key[len(prefix) :]: value
        for key, value in vars(args).items()
        if key.startswith(prefix) and key[len(prefix) :] in names
    }
