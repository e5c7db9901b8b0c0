"""Lint: nothing in distnet/, compression/, launch/ or cluster/ may use pickle.

Unpickling runs arbitrary code, so a pickle anywhere on a path that reads the
network or a file is remote code execution. Python files are checked on their
syntax tree (so docstrings that mention pickle are fine): imports of pickle-based
modules, ``send_pyobj``/``recv_pyobj``, ``read_pickle``/``to_pickle``, any
``allow_pickle=`` other than a literal False, and ``np.load`` without
``allow_pickle=False``. Other text files (shell scripts, job files) are searched
for the same calls. The lint is tested on examples first, so a silent lint fails too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("distnet", "compression", "launch", "cluster")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "shelve", "joblib"}
PICKLE_CALLS = {"send_pyobj", "recv_pyobj", "read_pickle", "to_pickle"}
NUMPY_NAMES = {"numpy", "cupy", "np"}  # "np": also when the import is out of sight
TEXT_PATTERNS = re.compile(
    r"\bimport\s+(c|_)?pickle\b|\bfrom\s+(c|_)?pickle\s+import\b|\bpickle\.(loads?|dumps?)\b"
    r"|allow_pickle\s*=\s*True|\b(send|recv)_pyobj\b|\bcloudpickle\b|\bdill\b")


def lint_python(source: str, name: str = "<src>") -> list[str]:
    """Pickle uses in Python ``source``, as ``name:line: what`` strings."""
    tree = ast.parse(source, name)
    numpy_aliases, load_names, problems = set(NUMPY_NAMES), set(), []

    def bad(node: ast.AST, what: str) -> None:
        problems.append(f"{name}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                root = a.name.split(".")[0]
                if root in PICKLE_MODULES:
                    bad(node, f"imports {a.name}")
                if root in NUMPY_NAMES:
                    numpy_aliases.add(a.asname or root)
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            if root in PICKLE_MODULES:
                bad(node, f"imports from {node.module}")
            for a in node.names:
                if a.name in PICKLE_MODULES or a.name in PICKLE_CALLS:
                    bad(node, f"imports {a.name} from {node.module}")
                if root in NUMPY_NAMES and a.name == "load":
                    load_names.add(a.asname or "load")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in PICKLE_CALLS:
            bad(node, f"uses .{node.attr}")
        if not isinstance(node, ast.Call):
            continue
        for kw in node.keywords:
            if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant)
                                                 and kw.value.value is False):
                bad(node, "allow_pickle is not a literal False")
        f = node.func
        is_np_load = (isinstance(f, ast.Attribute) and f.attr == "load"
                      and isinstance(f.value, ast.Name) and f.value.id in numpy_aliases) or (
            isinstance(f, ast.Name) and f.id in load_names)
        if is_np_load and not any(kw.arg == "allow_pickle" for kw in node.keywords):
            bad(node, "np.load without allow_pickle=False")
    return problems


def lint_text(text: str, name: str = "<text>") -> list[str]:
    return [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
            for m in TEXT_PATTERNS.finditer(text)]


BAD = [
    "import pickle", "import cPickle as p", "from pickle import loads", "import cloudpickle",
    "import dill.settings", "from joblib import load", "sock.send_pyobj(x)",
    "obj = sock.recv_pyobj()", "import numpy as np\nnp.load('f.npy')",
    "import numpy\nnumpy.load(f, mmap_mode='r')", "from numpy import load\nload('x')",
    "import numpy as xp\nxp.load(p, allow_pickle=True)", "np.load(p, allow_pickle=flag)",
    "df.to_pickle('x')", "from zmq import Socket\nSocket.recv_pyobj",
]
GOOD = [
    '"""Written without pickle."""', "import numpy as np\nnp.load(p, allow_pickle=False)",
    "# pickle would be unsafe here", "json.load(f)", "np.savez(f, **arrays)",
    "from numpy import load\nload(p, allow_pickle=False)", "checkpoint.load(path)",
]


@pytest.mark.parametrize("source", BAD)
def test_the_lint_catches(source):
    assert lint_python(source), source


@pytest.mark.parametrize("source", GOOD)
def test_the_lint_allows(source):
    assert lint_python(source) == [], source


def test_the_text_lint():
    assert lint_text("python -c 'import pickle'") and lint_text("x = sock.recv_pyobj()")
    assert lint_text("np.load(f, allow_pickle=True)")
    assert lint_text("# a job file, no pickle here\nmode = 'sync'") == []


def test_no_pickle_anywhere():
    problems, scanned = [], 0
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            rel = str(path.relative_to(ROOT))
            if path.suffix == ".py":
                problems += lint_python(path.read_text(encoding="utf-8"), rel)
            elif path.suffix in ("", ".sh", ".toml", ".cfg", ".ini", ".txt", ".json"):
                try:
                    problems += lint_text(path.read_text(encoding="utf-8"), rel)
                except UnicodeDecodeError:
                    continue  # binary data: not code
            else:
                continue
            scanned += 1
    assert scanned > 50  # the folders really were scanned
    assert problems == [], "pickle is not allowed:\n" + "\n".join(problems)
