"""``distnet``: the command line. One module per command under ``distnet/cli``.

Each command module has a docstring (its help), ``EXAMPLES`` (shown by --help),
``add_arguments(parser)`` and ``run(args) -> int``. Any option can also come from a
TOML job file (``--config job.toml``); options given on the command line win.
Errors print as one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

COMMANDS = {
    "run": "distnet.cli.run",
    "train": "distnet.cli.train",
    "eval": "distnet.cli.evaluate",
    "serve": "distnet.cli.serve",
    "compress": "distnet.cli.compress",
    "export": "distnet.cli.export",
    "keygen": "distnet.cli.keygen",
    "plot": "distnet.cli.plot",
}


def _available() -> dict[str, Any]:
    modules = {}
    for name, path in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(path)
        except ModuleNotFoundError as exc:
            if exc.name != path:  # the command exists but something it imports is missing
                raise
    return modules


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="distnet",
        description="Distributed training with a parameter server, and model compression.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for name, module in _available().items():
        doc = (module.__doc__ or name).strip()
        p = sub.add_parser(
            name, help=doc.splitlines()[0], description=doc,
            epilog="examples:\n" + getattr(module, "EXAMPLES", "").rstrip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", metavar="TOML", help="read options from a TOML job file")
        p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
        subparsers[name] = p
    return parser, subparsers


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Options from a TOML file, as argparse destinations; unknown keys are an error.

    A ``[COMMAND]`` table (e.g. ``[train]``) is read as well as top-level keys, so one
    job file can hold the settings of several commands.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    command = parser.prog.split()[-1]
    flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
    flat.update(data.get(command, {}))
    known = {a.dest for a in parser._actions}
    options = {}
    for key, value in flat.items():
        dest = key.replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            raise ValueError(f"{path}: unknown option {key!r} for 'distnet {command}'")
        options[dest] = value
    return options


def parse_command(argv: list[str]) -> argparse.Namespace:
    """``distnet ARGV`` parsed, with its ``--config`` file's options under the command
    line's (``args.command`` is None when no command was given)."""
    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
    elif args.config:
        sub = subparsers[args.command]
        sub.set_defaults(**load_config(args.config, sub))
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = parse_command(argv)
        if args.command is None:
            return 2
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("distnet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for users; the traceback only when asked for
        if debug:
            raise
        message = str(exc) or type(exc).__name__
        if isinstance(exc, KeyError) and exc.args:
            message = str(exc.args[0])
        print(f"distnet: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
