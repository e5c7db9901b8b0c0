"""The documentation cannot drift from the command line.

Every ``distnet ...`` command line in a shell code block of ``docs/*.md`` and
``README.md``, and in the comments of ``cluster/jobs/*.toml``, must parse with the real
parser (``distnet.cli.main.build_parser``); lines that go through the launcher
(``launch/local.sh``, ``launch/cluster.sh``, ``python -m distnet.dist.launcher``) must
parse as ``distnet train`` arguments. Every job file must load for each command it
has a table for, and the compression job files must hold exactly the recipes of
``benchmarks/bench_compression.py``. Nothing here trains, binds or launches anything.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from distnet.cli.main import COMMANDS, build_parser, load_config, main

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
JOB_FILES = sorted((ROOT / "cluster" / "jobs").glob("*.toml"))
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "zsh"}
LAUNCHERS = ("launch/local.sh", "launch/cluster.sh")
_FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
_OPERATORS = set("|&;<>()")


# ---- finding command lines -----------------------------------------------------------

def shell_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, logical line) of the shell code blocks of a Markdown file, with
    backslash continuations joined."""
    out: list[tuple[int, str]] = []
    fence, keep = None, False
    pending, start = "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None:
            if m:
                fence, keep = m.group(1), m.group(2).lower() in SHELL_FENCES
            continue
        if line.strip().startswith(fence):
            fence = None
            continue
        if not keep:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def comment_lines(path: Path) -> list[tuple[int, str]]:
    """Command lines quoted in the ``#`` comments of a TOML job file."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if text.startswith("#"):
            out.append((number, text.lstrip("#").strip()))
    return out


def tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def commands_in(line: str) -> list[tuple[str, list[str]]]:
    """``("distnet", argv)`` or ``("launcher", argv)`` for each command on a shell line."""
    if "distnet" not in line and not any(s in line for s in LAUNCHERS):
        return []
    try:
        toks = tokens(line)
    except ValueError:  # not shell syntax (prose in a comment)
        return []
    found, segment = [], []
    for tok in [*toks, ";"]:
        if set(tok) <= _OPERATORS:  # |, &&, ;, a redirection: the command ends here
            if segment and segment[-1].isdigit() and tok.startswith((">", "<")):
                segment.pop()  # 2>&1: the fd is not an argument
            found.extend(_command(segment))
            segment = []
        else:
            segment.append(tok)
    return found


def _command(segment: list[str]) -> list[tuple[str, list[str]]]:
    for i, tok in enumerate(segment):
        if tok == "distnet" or tok.endswith("/distnet"):
            return [("distnet", segment[i + 1:])]
        if tok.endswith(LAUNCHERS):
            return [("launcher", segment[i + 1:])]
        if tok == "-m" and i + 1 < len(segment):
            if segment[i + 1] == "distnet.cli.main":
                return [("distnet", segment[i + 2:])]
            if segment[i + 1] == "distnet.dist.launcher":
                return [("launcher", segment[i + 2:])]
    return []


def documented_commands() -> list[tuple[str, str, list[str]]]:
    cases = []
    sources = [(p, shell_lines(p)) for p in DOC_FILES] + [(p, comment_lines(p))
                                                          for p in JOB_FILES]
    for path, lines in sources:
        for number, line in lines:
            for kind, argv in commands_in(line):
                cases.append((f"{path.relative_to(ROOT)}:{number}", kind, argv))
    return cases


COMMAND_CASES = documented_commands()


# ---- parsing ------------------------------------------------------------------------------

def parse(argv: list[str], where: str):
    """Parse like ``distnet`` does, reading a job file given with --config; no command runs."""
    parser, subparsers = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(argv)
            if args.command and getattr(args, "config", None):
                job = ROOT / args.config
                if job.is_file() or args.config.startswith("cluster/jobs/"):
                    sub = subparsers[args.command]
                    sub.set_defaults(**load_config(str(job), sub))
                    args = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):  # --help exits 0
            pytest.fail(f"{where}: `distnet {shlex.join(argv)}` does not parse: "
                        f"{err.getvalue().strip()}")
        return None
    return args


def launcher_train_args(argv: list[str], monkeypatch) -> list[str]:
    """The ``distnet train`` arguments the launcher would run (its own parser, no mpiexec)."""
    from distnet.dist import launcher

    captured: list[list[str]] = []

    def fake_build_command(cmd_argv, n, **kwargs):
        captured.append(list(cmd_argv))
        return ["mpiexec"]

    monkeypatch.setattr(launcher, "build_command", fake_build_command)
    args = [a for a in argv if a != "--dry-run"]
    if "--hostfile" in args:  # launch/cluster.sh passes its --hostfile on
        i = args.index("--hostfile")
        assert (ROOT / args[i + 1]).is_file(), f"hostfile {args[i + 1]} not in the repository"
    with contextlib.redirect_stdout(io.StringIO()):
        assert launcher.main(["--dry-run", *args]) == 0
    prefix = ["-m", "distnet.cli.main", "train"]
    assert captured and captured[0][:3] == prefix, captured
    return captured[0][3:]


def test_the_docs_hold_commands():
    """A broken extractor must not pass by finding nothing."""
    assert len(COMMAND_CASES) >= 40, [c[0] for c in COMMAND_CASES]
    kinds = {argv[0] for _, kind, argv in COMMAND_CASES if kind == "distnet" and argv}
    assert {"train", "serve", "keygen", "compress", "export", "eval"} <= kinds


@pytest.mark.parametrize("where, kind, argv", COMMAND_CASES,
                         ids=[c[0] for c in COMMAND_CASES])
def test_documented_command_parses(where, kind, argv, monkeypatch):
    if kind == "launcher":
        argv = ["train", *launcher_train_args(argv, monkeypatch)]
    if argv and not argv[0].startswith("-"):
        assert argv[0] in COMMANDS, f"{where}: no command `distnet {argv[0]}`"
    parse(argv, where)


def test_extractor_handles_shell_syntax():
    line = ("sudo cluster/netns.sh exec w1 env DISTNET_RANK=0 .venv/bin/distnet train "
            "--epochs 1 2>&1 | tail -3 && distnet eval --checkpoint m.npz  # a comment")
    assert commands_in(line) == [("distnet", ["train", "--epochs", "1"]),
                                 ("distnet", ["eval", "--checkpoint", "m.npz"])]
    assert commands_in("python -m distnet.cli.main serve --bind tcp://10.77.0.1:5555") == [
        ("distnet", ["serve", "--bind", "tcp://10.77.0.1:5555"])]
    assert commands_in("launch/local.sh -n 3 --mode async") == [
        ("launcher", ["-n", "3", "--mode", "async"])]
    assert commands_in("pip install -e '.[mpich]'") == []


def test_a_wrong_option_is_caught():
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        parse(["train", "--no-such-option"], "here")
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        parse(["train", "--workers", "N"], "here")


# ---- job files ----------------------------------------------------------------------------

def job_commands(path: Path) -> list[str]:
    """The commands a job file has tables for (top-level keys alone: ``train``)."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    tables = [k for k, v in data.items() if isinstance(v, dict)]
    unknown = sorted(set(tables) - set(COMMANDS))
    assert not unknown, f"{path.name}: tables {unknown} name no distnet command"
    return tables or ["train"]


def flat_options(path: Path, command: str) -> dict:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    flat = {k.replace("-", "_"): v for k, v in data.items() if not isinstance(v, dict)}
    flat.update({k.replace("-", "_"): v for k, v in data.get(command, {}).items()})
    return flat


@pytest.mark.parametrize("path", JOB_FILES, ids=[p.name for p in JOB_FILES])
def test_job_file_loads(path, capsys):
    parser, subparsers = build_parser()
    for command in job_commands(path):
        options = load_config(str(path), subparsers[command])  # unknown keys raise
        assert options == flat_options(path, command)
        if command == "train":
            code = main(["train", "--config", str(path), "--print-config"])
            out, err = capsys.readouterr()
            assert code == 0, err
            resolved = tomllib.loads(out)
            for key, value in options.items():
                assert resolved[key] == value, (path.name, key)
        elif command == "serve":
            from distnet.cli.train import resolve

            sub = subparsers["serve"]
            sub.set_defaults(**options)
            config = resolve(parser.parse_args(["serve", "--config", str(path)]))
            assert 0 <= config["server_id"] < config["servers"]


def test_train_and_serve_agree_in_shared_job_files():
    """A job file for both `train` and `serve` must give both the same model and recipe:
    a server builds its parameters from the same seeded model as the workers."""
    from distnet.cli.train import resolve

    shared = ("model", "data", "val_size", "seed", "mode", "workers", "servers", "epochs",
              "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule",
              "warmup_steps", "staleness", "staleness_lr", "push_every", "keys")
    checked = 0
    for path in JOB_FILES:
        if not {"train", "serve"} <= set(job_commands(path)):
            continue
        configs = {}
        for command in ("train", "serve"):
            parser, subparsers = build_parser()
            sub = subparsers[command]
            sub.set_defaults(**load_config(str(path), sub))
            configs[command] = resolve(parser.parse_args([command, "--config", str(path)]))
        for key in shared:
            assert configs["train"][key] == configs["serve"][key], (path.name, key)
        checked += 1
    assert checked >= 1


def _bench_presets() -> dict:
    bench = ROOT / "benchmarks"
    spec = importlib.util.spec_from_file_location("bench_compression",
                                                  bench / "bench_compression.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(bench))  # as when it runs as a script: it imports bench_step
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    return module.PRESETS


COMPRESS_JOBS = [p for p in JOB_FILES if "compress" in job_commands(p)]


class _Captured(Exception):
    pass


@pytest.mark.parametrize("path", COMPRESS_JOBS, ids=[p.name for p in COMPRESS_JOBS])
def test_compress_job_matches_the_benchmark_recipe(path, monkeypatch, capsys):
    """`distnet compress --config FILE` builds exactly the plan of the benchmark preset
    its name gives (compress-<preset>.toml): the plan is captured, nothing is trained."""
    import compression.pipeline as pipeline
    import distnet.cli.compress as compress_cli

    plans = []

    def fake_compress(model, train, val, plan, **kwargs):
        plans.append(plan)
        raise _Captured

    monkeypatch.setattr(compress_cli, "_load", lambda args: (None, None, None, {}, {}))
    monkeypatch.setattr(pipeline, "compress", fake_compress)
    code = main(["compress", "--checkpoint", "unused.npz", "--config", str(path)])
    capsys.readouterr()
    assert code == 1 and len(plans) == 1, "distnet compress did not reach the pipeline"
    preset = path.stem.removeprefix("compress-")
    presets = _bench_presets()
    assert preset in presets, f"{path.name}: no preset {preset!r} in bench_compression.py"
    assert asdict(plans[0]) == asdict(pipeline.CompressionPlan(**presets[preset]))


def test_every_benchmark_preset_has_a_job_file():
    names = {p.stem.removeprefix("compress-") for p in COMPRESS_JOBS}
    assert set(_bench_presets()) <= names


def test_hostfile_parses():
    from distnet.dist.launcher import read_hostfile

    hosts = read_hostfile(ROOT / "cluster" / "hosts")
    assert hosts and all(h.slots >= 1 for h in hosts)
