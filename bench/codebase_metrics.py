"""Shape of the codebase, for before/after comparisons of refactors (issue: "a codebase the next engineer
can carry on").

Static (read from the source, no import): the longest functions, functions of 60 lines or more, the
docstring-to-code line ratio, and cycles among module-level imports inside the package.
Dynamic (`--trace`): one `python -m dsv4_train train.max_steps=1` in a child process under a profiler
hook, counting the package modules whose code ran from the entry to the loss, and how many times the
run was composed (Hydra's `compose_config`), typed (`to_typed`) and validated (`validate`).

    OMP_NUM_THREADS=1 python bench/codebase_metrics.py [--root .] [--trace]
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import subprocess
import sys
import tokenize
from pathlib import Path

PACKAGE = "dsv4_train"


def _modules(root: Path) -> dict:
    """module name -> path, for every .py file of the package."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _code_and_doc_lines(source: str) -> tuple:
    """(code lines, docstring lines): non-blank lines outside docstrings, and lines inside them.
    Comments count as neither."""
    tree = ast.parse(source)
    doc_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                doc_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    comment_only = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.line.strip().startswith("#"):
            comment_only.add(token.start[0])
    code = doc = 0
    for number, line in enumerate(source.splitlines(), start=1):
        if not line.strip():
            continue
        if number in doc_lines:
            doc += 1
        elif number not in comment_only:
            code += 1
    return code, doc


def _functions(name: str, source: str):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{name}.{node.name}", node.end_lineno - node.lineno + 1


def _imports(name: str, source: str, known: set, *, deferred: bool) -> set:
    """Package modules imported at module level (`if TYPE_CHECKING` excluded), and with `deferred`
    also inside functions (a cycle through a deferred import still ties two modules together)."""
    found = set()
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        nodes = list(ast.walk(node)) if deferred or isinstance(node, (ast.If, ast.Try)) else [node]
        for item in nodes:
            if isinstance(item, ast.ImportFrom) and item.module and item.level == 0:
                for alias in item.names:
                    candidate = f"{item.module}.{alias.name}"
                    found.add(candidate if candidate in known else item.module)
            elif isinstance(item, ast.Import):
                found.update(alias.name for alias in item.names)
    return {m for m in found if m in known and m != name}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in graph:
        if node not in index:
            visit(node)
    return out


def static_metrics(root: Path) -> dict:
    modules = _modules(root)
    code = doc = 0
    functions, graph, deferred_graph = [], {}, {}
    for name, path in modules.items():
        source = path.read_text()
        c, d = _code_and_doc_lines(source)
        code, doc = code + c, doc + d
        functions.extend(_functions(name, source))
        graph[name] = _imports(name, source, set(modules), deferred=False)
        deferred_graph[name] = _imports(name, source, set(modules), deferred=True)
    functions.sort(key=lambda item: -item[1])
    return {
        "modules": len(modules),
        "code_lines": code,
        "docstring_lines": doc,
        "docstring_to_code": round(doc / max(code, 1), 3),
        "longest_functions": functions[:8],
        "functions_60_lines_or_more": sum(1 for _, n in functions if n >= 60),
        "import_cycles": _cycles(graph),
        "import_cycles_with_deferred_imports": _cycles(deferred_graph),
    }


_TRACER = r"""
import collections, json, os, sys, threading
counts, modules = collections.Counter(), set()
WATCH = {"compose_config", "to_typed", "validate"}
def hook(frame, event, arg):
    if event != "call":
        return
    code = frame.f_code
    path = code.co_filename
    if "/dsv4_train/" in path:
        modules.add(path.split("/dsv4_train/", 1)[1])
    if code.co_name in WATCH and ("/dsv4_train/config/" in path or "/hydra/_internal/hydra.py" in path):
        counts[code.co_name] += 1
def dump():
    with open(os.environ["DSV4_TRACE_OUT"], "w") as f:
        json.dump({"counts": counts, "modules": sorted(modules)}, f)
import atexit
atexit.register(dump)
sys.setprofile(hook)
threading.setprofile(hook)
import runpy
sys.argv = ["dsv4_train", *sys.argv[1:]]
runpy.run_module("dsv4_train", run_name="__main__", alter_sys=True)
"""


def traced_run(root: Path, run_dir: Path) -> dict:
    out = run_dir / "trace.json"
    env = dict(os.environ, DSV4_TRACE_OUT=str(out), OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1",
               PYTHONPATH=str(root), WANDB_MODE="disabled")
    result = subprocess.run([sys.executable, "-c", _TRACER, "train.max_steps=1", "optim.warmup_steps=0", f"run.dir={run_dir / 'run'}"],
                            cwd=root, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"traced run failed:\n{result.stderr[-3000:]}")
    data = json.loads(out.read_text())
    packages = sorted({m.split("/")[0] if "/" in m else "(top)" for m in data["modules"]})
    return {"modules_run": len(data["modules"]), "packages_run": packages, "calls": data["counts"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--trace", action="store_true", help="also trace a one-step tiny run")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    report = static_metrics(root)
    if args.trace:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            report.update(traced_run(root, Path(tmp)))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
