"""The package's shape, side by side with an earlier commit: modules, their sizes, the densest
functions, import layers, and whether the filesystem stays inside backends/.

    .venv/bin/python bench/shape.py                 # this checkout against c5f8c23 (before issue 16)
    .venv/bin/python bench/shape.py --before REV --json

Complexity is McCabe's: 1 + one per branch point (if/elif, loops, except, with, and/or operands
beyond the first, conditional expressions, comprehension filters, match cases, assert), counted
from the AST. Import layers: a module imported by nothing it imports sits on layer 1; every other
module sits one layer above the highest module it imports at import time (those under
``if TYPE_CHECKING:`` name types and do not count). Imports inside functions are listed apart
where two modules import each other that way. A cycle would make layers meaningless, so it is reported instead.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEAK = re.compile(r"\bbtrfsutil\b|\bzfs\(")
FS_BRANCH = re.compile(r"""(\.kind|\.backend|\bbackend|fstype)\s*[!=]=\s*["'](btrfs|zfs)["']|isinstance\([^)]*(Zfs|Btrfs)""")


def complexity(node: ast.AST) -> int:
    count = 1
    for child in ast.walk(node):
        if child is not node and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(child, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.IfExp, ast.ExceptHandler, ast.With, ast.AsyncWith, ast.Assert)):
            count += 1
        elif isinstance(child, ast.BoolOp):
            count += len(child.values) - 1
        elif isinstance(child, ast.comprehension):
            count += 1 + len(child.ifs)
        elif isinstance(child, ast.match_case):
            count += 1
    return count


def functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, ast.AST]]:
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append((prefix + node.name, node))
            found += functions(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            found += functions(node, prefix + node.name + ".")
    return found


def imports(tree: ast.AST, module: str, known: set[str], lazy: bool = True) -> set[str]:
    """What ``module`` needs at run time (with ``lazy``, also what its functions import when they
    run); imports under ``if TYPE_CHECKING:`` name types only and never count."""
    skipped = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
               for n in ast.walk(block)}
    if not lazy:
        skipped |= {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join(module.split(".")[: -node.level] + [node.module])
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                out.add(name)
    return out


def measure(root: Path) -> dict[str, object]:
    files = sorted(p for p in (root / "snapsync").rglob("*.py") if "__pycache__" not in p.parts)
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    trees = {m: ast.parse(p.read_text()) for m, p in modules.items()}
    sizes = [len(p.read_text().splitlines()) for m, p in modules.items() if not p.name == "__init__.py" or p.stat().st_size > 800]
    dense = sorted(((complexity(f), f"{m}:{name}") for m, t in trees.items() for name, f in functions(t)), reverse=True)[:10]
    graph = {m: imports(t, m, set(modules), lazy=False) for m, t in trees.items()}
    everything = {m: imports(t, m, set(modules)) for m, t in trees.items()}
    lazy_cycles = sorted({" <-> ".join(sorted((m, d))) for m in everything for d in everything[m] if m in everything.get(d, set())})
    layers: dict[str, int] = {}
    cycle: list[str] = []

    def layer(m: str, path: tuple[str, ...] = ()) -> int:
        if m in layers:
            return layers[m]
        if m in path:
            cycle[:] = list(path[path.index(m):]) + [m]
            return 0
        layers[m] = value = 1 + max((layer(d, path + (m,)) for d in graph[m]), default=0)
        return value

    for m in modules:
        layer(m)
    packages = sorted({m.split(".")[1] for m in modules if m.count(".") >= 2})
    outside = [p for p in files if "backends" not in p.relative_to(root).parts]
    leaks = [f"{p.relative_to(root)}:{i}" for p in outside for i, line in enumerate(p.read_text().splitlines(), 1) if LEAK.search(line)]
    branches = [f"{p.relative_to(root)}:{i}" for p in outside for i, line in enumerate(p.read_text().splitlines(), 1) if FS_BRANCH.search(line)]
    return {
        "modules": len([p for p in files if p.name != "__init__.py" or p.stat().st_size > 800]),
        "packages": packages,
        "median_lines": statistics.median(sizes),
        "largest": max((len(p.read_text().splitlines()), m) for m, p in modules.items()),
        "densest": dense,
        "import_layers": max(layers.values()) if not cycle else None,
        "import_cycle": cycle,
        "mutual_imports_in_functions": lazy_cycles,
        "filesystem_calls_outside_backends": leaks,
        "filesystem_branches_outside_backends": branches,
    }


def checkout(rev: str, into: Path) -> Path:
    data = subprocess.run(["git", "archive", rev, "snapsync"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="c5f8c23", help="the commit to compare with")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = measure(checkout(args.before, Path(tmp)))
    after = measure(ROOT)
    if args.json:
        print(json.dumps({"before": before, "after": after}, indent=2, default=str))
        return 0
    rows = [
        ("modules", before["modules"], after["modules"]),
        ("packages", ", ".join(before["packages"]) or "-", ", ".join(after["packages"])),  # type: ignore[arg-type]
        ("median module (lines)", before["median_lines"], after["median_lines"]),
        ("largest module", "{1} {0}".format(*before["largest"]), "{1} {0}".format(*after["largest"])),  # type: ignore[str-format]
        ("import layers", before["import_layers"] or f"cycle {before['import_cycle']}", after["import_layers"] or f"cycle {after['import_cycle']}"),
        ("btrfsutil / zfs( outside backends/", len(before["filesystem_calls_outside_backends"]), len(after["filesystem_calls_outside_backends"])),  # type: ignore[arg-type]
        ("filesystem-type branches outside backends/", len(before["filesystem_branches_outside_backends"]), len(after["filesystem_branches_outside_backends"])),  # type: ignore[arg-type]
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'before (' + args.before + ')':<40}  this checkout")
    for name, b, a in rows:
        print(f"{name:{width}}  {str(b):<40}  {a}")
    print("\nten most complex functions (McCabe):")
    for (cb, fb), (ca, fa) in zip(before["densest"], after["densest"]):  # type: ignore[call-overload]
        print(f"  {cb:3} {fb:<58} {ca:3} {fa}")
    print("\nmodules importing each other (one side inside a function):")
    print(f"  before: {', '.join(before['mutual_imports_in_functions']) or 'none'}")  # type: ignore[arg-type]
    print(f"  now:    {', '.join(after['mutual_imports_in_functions']) or 'none'}")  # type: ignore[arg-type]
    for key in ("filesystem_calls_outside_backends", "filesystem_branches_outside_backends"):
        for hit in after[key]:  # type: ignore[attr-defined]
            print(f"{key}: {hit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
