"""The package's boundaries, read from the code itself: the filesystem stays inside backends/,
and the planning core stays pure. A failure names the file, the line and what crossed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "snapsync"
FILESYSTEM_NAMES = {"btrfs", "zfs"}
BACKEND_CLASSES = ("Btrfs", "Zfs", "Copies")
IO_MODULES = {"os", "subprocess", "shutil", "socket", "select", "signal", "tempfile", "btrfsutil", "boto3", "psycopg", "sh"}
PURE_IMPORTS = ("snapsync.plan", "snapsync.backends.base", "snapsync.policy.durations", "snapsync.policy.units", "snapsync.errors", "snapsync.clock")


def modules(*parts: str) -> list[Path]:
    return sorted(p for p in PACKAGE.joinpath(*parts).rglob("*.py"))


def outside_backends() -> list[Path]:
    return [p for p in modules() if "backends" not in p.relative_to(PACKAGE).parts]


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}"


def imported(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    found: list[tuple[ast.AST, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node, node.module))
    return found


@pytest.mark.parametrize("path", outside_backends(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_filesystem_act_outside_backends(path: Path) -> None:
    found = crossings(path, ast.parse(path.read_text()))
    assert not found, "\n".join(found)


def crossings(path: Path, tree: ast.AST) -> list[str]:
    crossings = [f"{where(path, n)} imports {m}" for n, m in imported(tree) if m.split(".")[0] == "btrfsutil"]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr if isinstance(node.func, ast.Attribute) else ""
            if name == "zfs":
                crossings.append(f"{where(path, node)} runs zfs()")
            if name == "isinstance" and any(c in ast.unparse(a) for a in node.args[1:] for c in BACKEND_CLASSES):
                crossings.append(f"{where(path, node)} tests a backend's class: {ast.unparse(node)}")
            if isinstance(node.func, ast.Name) and node.func.id in {"Popen", "run"} and node.args:
                argv = node.args[0]
                if isinstance(argv, (ast.List, ast.Tuple)) and argv.elts and isinstance(argv.elts[0], ast.Constant) and argv.elts[0].value in FILESYSTEM_NAMES | {"mkfs.btrfs"}:
                    crossings.append(f"{where(path, node)} runs {argv.elts[0].value}")
    return crossings


@pytest.mark.parametrize("path", outside_backends(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_branch_on_the_filesystem_outside_backends(path: Path) -> None:
    """Callers ask Capabilities; a third filesystem must not need an edit here."""
    found = branches(path, ast.parse(path.read_text()))
    assert not found, "\n".join(found)


def branches(path: Path, tree: ast.AST) -> list[str]:
    branches = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Constant) and o.value in FILESYSTEM_NAMES for o in operands):
                branches.append(f"{where(path, node)}: {ast.unparse(node)}")
        if isinstance(node, ast.Dict) and {k.value for k in node.keys if isinstance(k, ast.Constant)} >= FILESYSTEM_NAMES:
            branches.append(f"{where(path, node)}: a table keyed by filesystem")
    return branches


@pytest.mark.parametrize("path", modules("plan"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_planning_core_is_pure(path: Path) -> None:
    """plan/ decides from data and an injected clock: no I/O module, nothing from the edges."""
    tree = ast.parse(path.read_text())
    bad = []
    for node, name in imported(tree):
        if name.split(".")[0] in IO_MODULES:
            bad.append(f"{where(path, node)} imports {name}")
        elif name.startswith("snapsync") and not name.startswith(PURE_IMPORTS) and not _type_only(tree, node):
            bad.append(f"{where(path, node)} imports {name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in {"datetime.now", "time.time", "time.monotonic", "open"}:
            bad.append(f"{where(path, node)} calls {ast.unparse(node.func)}")
    assert not bad, "\n".join(bad)


def _type_only(tree: ast.AST, node: ast.AST) -> bool:
    """Imports under ``if TYPE_CHECKING:`` carry types, not behaviour."""
    for block in ast.walk(tree):
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING" and node in list(ast.walk(block)):
            return True
    return False


def test_the_boundary_checks_see_a_crossing() -> None:
    """The walkers above find each kind of crossing (so a green run means something)."""
    path = PACKAGE / "ops" / "planted.py"
    sample = ast.parse(
        'import btrfsutil\nif group.backend == "zfs":\n    zfs("list")\n'
        'isinstance(b, ZfsBackend)\nrun(["mkfs.btrfs", dev])\nx = {"btrfs": 1, "zfs": 2}\n'
    )
    assert {c.split(" ", 1)[1] for c in crossings(path, sample)} == {
        "imports btrfsutil", "runs zfs()", "tests a backend's class: isinstance(b, ZfsBackend)", "runs mkfs.btrfs",
    }
    assert len(branches(path, sample)) == 2


def test_the_policy_names_exactly_the_registered_filesystems() -> None:
    """The one place outside backends/ that spells the names: what a policy's ``backend`` may say."""
    from typing import get_args

    from snapsync.backends import FILESYSTEMS
    from snapsync.policy.schema import Group

    assert get_args(Group.model_fields["backend"].annotation) == tuple(FILESYSTEMS)
