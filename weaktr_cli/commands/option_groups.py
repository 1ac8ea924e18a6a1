"""Options that always travel together, declared once and handed to a command as one value.

A group (`OptionGroup`) lists Typer options and a function that makes one value of them. A
command names the group in its signature, `output: Annotated[Output, options.OUTPUT]`, and is
registered with `add_command`, which hands Typer `with_groups(command)`: Typer then sees the
group's options in that place of the signature (so `--help`, the option order and the
completions are as if the command had declared them itself) and the command receives the value
the group makes. Every command is registered this way, so none can forget it.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer

from weaktr_cli.commands.helptext import reflow


@dataclass(frozen=True)
class OptionGroup:
    """Typer options (name -> (Annotated type, default)) and `make(**their values)`."""

    options: dict[str, tuple[Any, Any]]
    make: Callable[..., Any]

    def parameters(self, kind: inspect._ParameterKind) -> list[inspect.Parameter]:
        """The options as parameters of `kind`, the kind of the group parameter they replace."""
        return [inspect.Parameter(name, kind, default=default, annotation=annotation)
                for name, (annotation, default) in self.options.items()]


def _group_of(parameter: inspect.Parameter) -> OptionGroup | None:
    if typing.get_origin(parameter.annotation) is not typing.Annotated:
        return None
    found = [m for m in parameter.annotation.__metadata__ if isinstance(m, OptionGroup)]
    return found[0] if found else None


def with_groups(command: Callable[..., None]) -> Callable[..., None]:
    """`command` as Typer should see it: each group parameter replaced by the group's options.

    Typer reads the parameters from `inspect.signature` (hence the wrapper's `__signature__`)
    and calls the command with keyword arguments, which the wrapper turns back into one value
    per group.
    """
    signature = inspect.signature(command, eval_str=True)
    groups: dict[str, OptionGroup] = {}
    shown: list[inspect.Parameter] = []
    for name, parameter in signature.parameters.items():
        group = _group_of(parameter)
        if group is None:
            shown.append(parameter)
        else:
            groups[name] = group
            shown += group.parameters(parameter.kind)

    @functools.wraps(command)
    def run(**values: Any) -> None:
        for name, group in groups.items():
            values[name] = group.make(**{option: values.pop(option) for option in group.options})
        command(**values)

    run.__signature__ = signature.replace(parameters=shown)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in shown}
    return run


def add_command(app: typer.Typer, name: str, help: str, command: Callable[..., None]) -> None:
    """Register `command` as `name` of `app`: its option groups expanded, its help reflowed."""
    app.command(name, help=reflow(help))(with_groups(command))
