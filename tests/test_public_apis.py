"""seqactor uses only the public API of the libraries it builds on (trio, trio-websocket,
wsproto, h11, coredis): no private module, no ``_name`` attribute of theirs, anywhere in
``src/``. A private name may change in any release; an upgrade must not break us silently.

The scan reads every module's syntax tree (not text): an import of a private module or name
from one of those libraries, an attribute ``x._name`` reached from one of their modules
(``trio.lowlevel._x``), and an attribute ``obj._name`` (or ``getattr``/``setattr``/``hasattr``
with a literal ``"_name"``) whose name our own code never defines — so it can only be someone
else's, such as ``conn._wsproto`` on a trio-websocket connection. Compiled sources (``.pyx``,
``.pxd``) must not import those libraries at all.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
LIBRARIES = frozenset({"trio", "trio_websocket", "wsproto", "h11", "coredis"})
GENERATED = ("_proto",)  # generated at build time, never edited
ACCESSORS = frozenset({"getattr", "setattr", "hasattr", "delattr"})


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _sources() -> list[Path]:
    return sorted(
        p for p in SRC.rglob("*.py") if not any(part in GENERATED for part in p.parts)
    )


def _own_private_names(trees: dict[Path, ast.Module]) -> set[str]:
    """Every ``_name`` our code defines: functions, classes, attributes assigned on any
    object, slots, module-level and class-level names, parameters."""
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
                if not isinstance(node, ast.ClassDef):
                    args = node.args
                    for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                        names.add(arg.arg)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
            ):
                for const in ast.walk(node.value):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str):
                        names.add(const.value)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
    return {n for n in names if _private(n)}


def _library_aliases(tree: ast.Module) -> dict[str, str]:
    """Local names bound to a library module (``import trio_websocket as tws`` -> tws)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES:
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in LIBRARIES:
                for alias in node.names:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _other_modules(tree: ast.Module) -> set[str]:
    """Local names bound to modules outside those libraries (``argparse``): their private
    names are not what this test is about."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(
                (a.asname or a.name.split(".")[0]) for a in node.names
                if a.name.split(".")[0] not in LIBRARIES
            )
    return names


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def private_uses(path: Path, tree: ast.Module, own: set[str]) -> list[str]:
    """``file:line what`` for every use of a library's private module or attribute."""
    rel = path.relative_to(SRC.parent) if path.is_relative_to(SRC.parent) else path.name
    found: list[str] = []
    aliases = _library_aliases(tree)
    others = _other_modules(tree)
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in LIBRARIES and any(_private(p) for p in parts):
                    found.append(f"{where} import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] in LIBRARIES:
                if any(_private(p) for p in parts):
                    found.append(f"{where} from {node.module} import ...")
                for alias in node.names:
                    if _private(alias.name):
                        found.append(f"{where} from {node.module} import {alias.name}")
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            root = _root(node.value)
            if root in aliases:
                found.append(f"{where} {ast.unparse(node)} ({aliases[root]})")
            elif node.attr not in own and root not in others:
                found.append(f"{where} {ast.unparse(node)} (not defined by seqactor)")
        elif (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in ACCESSORS and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
            and _private(node.args[1].value) and node.args[1].value not in own
        ):
            found.append(f"{where} {ast.unparse(node)} (not defined by seqactor)")
    return found


def scan(paths: list[Path] | None = None) -> list[str]:
    trees = {p: ast.parse(p.read_text(), str(p)) for p in (paths or _sources())}
    all_trees = {p: ast.parse(p.read_text(), str(p)) for p in _sources()}
    own = _own_private_names(all_trees)
    return [use for path, tree in trees.items() for use in private_uses(path, tree, own)]


def test_src_uses_no_private_api_of_its_libraries() -> None:
    uses = scan()
    assert uses == [], "private library APIs used in src/:\n" + "\n".join(uses)


def test_compiled_sources_import_none_of_those_libraries() -> None:
    pattern = re.compile(rf"^\s*(from|c?import)\s+({'|'.join(sorted(LIBRARIES))})\b", re.M)
    offenders = [
        str(p.relative_to(SRC.parent))
        for ext in ("*.pyx", "*.pxd")
        for p in SRC.rglob(ext)
        if pattern.search(p.read_text())
    ]
    assert offenders == []


def test_the_scan_finds_what_the_old_gateway_did(tmp_path: Path) -> None:
    """The checker itself: the kinds of use the gateway had before its own WebSocket layer."""
    sample = tmp_path / "src" / "seqactor" / "sample.py"
    sample.parent.mkdir(parents=True)
    sample.write_text(
        "import trio\n"
        "import trio_websocket as tws\n"
        "from coredis._utils import hash_slot\n"
        "from trio import _core\n"
        "async def f(conn: tws.WebSocketConnection) -> None:\n"
        "    request = await conn._get_request()\n"
        "    ws = conn._wsproto\n"
        "    state = getattr(conn._recv_channel, '_state', None)\n"
        "    trio.lowlevel._private_thing()\n"
        "    print(request, ws, state, hash_slot, _core, trio.__version__)\n"
    )
    tree = ast.parse(sample.read_text())
    uses = sorted(u.split(" ", 1)[1] for u in private_uses(sample, tree, own=set()))
    assert uses == sorted([
        "from coredis._utils import ...",
        "from trio import _core",
        "conn._get_request (not defined by seqactor)",
        "conn._wsproto (not defined by seqactor)",
        "conn._recv_channel (not defined by seqactor)",
        "getattr(conn._recv_channel, '_state', None) (not defined by seqactor)",
        "trio.lowlevel._private_thing (trio)",
    ])
