"""The command line: how `python searchr1.py [COMMAND] [flags]` becomes a command and a Config.

Read by searchr1.py (its `main`) and by commands.py; a first read may skip it. It imports nothing
of ours: the Config class and the commands come in as arguments.

    Command      one command's home: what it runs, its description, the Config fields it reads
                 (its flags) with its own defaults for some, and any arguments of its own
    parse        argv -> (the command's name, a Config, the command's arguments); presets (what
                 `--model tiny` sets) are defaults that a flag on the command line still overrides
    UsageError   a mistake in what the user asked for: printed as one line, exit code 2
    NothingToDo  nothing left to do (a finished run resumed): printed as one line, exit code 0
"""
import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Callable


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2."""


class NothingToDo(Exception):
    """The command has nothing left to do (a finished run resumed): printed as one line, exit code 0."""


def flag(name: str) -> str:
    """The command-line flag of a Config field: max_turns -> --max-turns."""
    return "--" + name.replace("_", "-")


def opt(default, help: str):
    """A Config field whose help text is also its documentation on the command line."""
    return field(default=default, metadata={"help": help})


@dataclass
class Command:
    run: Callable                     # run(cfg, args) -> what is printed as JSON at the end, or None
    description: str                  # its --help; the first sentence is its line in `searchr1.py --help`
    reads: tuple | None = None        # the Config fields it reads, its flags (None: every field)
    defaults: dict = field(default_factory=dict)  # its own defaults for some of them
    arguments: Callable | None = None  # arguments(parser): adds the arguments of its own
    epilog: str = ""                  # printed under its flags


def commands_help(commands: dict[str, Command]) -> str:
    """`searchr1.py --help`: the commands, one line each."""
    lines = ["usage: searchr1.py [COMMAND] [flags]", "", "commands (train when none is given):"]
    lines += [f"  {name:<7} {command.description.split('. ')[0].rstrip('.')}" for name, command in commands.items()]
    return "\n".join(lines + ["", "searchr1.py COMMAND --help lists the flags of a command, "
                                  "e.g. searchr1.py train --help"])


def command_parser(name: str, command: Command, config) -> argparse.ArgumentParser:
    """A parser with a --flag for each field of the Config class `config` that the command reads,
    at the command's defaults, then the command's own arguments."""
    parser = argparse.ArgumentParser(prog=f"searchr1.py {name}", description=command.description,
                                     epilog=command.epilog or None)
    for f in dataclasses.fields(config):
        if command.reads is not None and f.name not in command.reads:
            continue
        default = command.defaults.get(f.name, f.default)
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag(f.name), type=type(f.default), default=default,
                                help=f"{f.metadata['help']} (default: {default})")
    if command.arguments:
        command.arguments(parser)
    return parser


def parse(argv: list[str], commands: dict[str, Command], config, presets: Callable[[argparse.Namespace], dict]):
    """(the command's name, a `config` instance, the parsed arguments) of argv. The fields the command does
    not read keep the command's defaults, else the class's; presets(the flags given) -> more defaults."""
    name = argv.pop(0) if argv and argv[0] in commands else "train"
    command = commands[name]
    parser = command_parser(name, command, config)
    parser.set_defaults(**presets(parser.parse_known_args(argv)[0]))
    args = parser.parse_args(argv)
    defaults = {f.name: command.defaults.get(f.name, f.default) for f in dataclasses.fields(config)}
    return name, config(**{key: getattr(args, key, default) for key, default in defaults.items()}), args
