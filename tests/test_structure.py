"""The package's shape: its import graph (every import, at the top of a module or inside a function) has
no cycle, and the layering rules the code relies on hold."""
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "eagle_online"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules a file imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found.update(n for n in names if n in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert "eagle_online.sharded" in graph["eagle_online.target"]  # the graph sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_package_module_parses_arguments():
    """Command lines belong to the entry points in launch/; the package is called with values."""
    parsers = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
               if "argparse" in _imported_names(p)]
    assert parsers == []


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


DOC_REFERENCE = re.compile(r"\bdocs/[A-Za-z0-9_.-]+\.md\b")
MARKDOWN_LINK = re.compile(r"\]\(([^)#:\s]+\.md)(?:#[^)]*)?\)")


def test_every_docs_reference_resolves():
    """`docs/<page>.md` in code, recipes, launch notes and docs, and relative links between docs pages,
    name files that exist in the repository."""
    root = PACKAGE.parent
    files = [p for pattern in ("eagle_online/**/*.py", "launch/**/*.py", "launch/*.md", "recipes/*.yaml",
                               "docs/*.md", "README.md", "tests/*.py")
             for p in root.glob(pattern)]
    seen, missing = 0, []
    for path in files:
        text = path.read_text()
        for ref in DOC_REFERENCE.findall(text):
            seen += 1
            if not (root / ref).is_file():
                missing.append(f"{path.relative_to(root)}: {ref}")
        if path.parent.name == "docs":
            for link in MARKDOWN_LINK.findall(text):
                seen += 1
                if not (path.parent / link).is_file():
                    missing.append(f"{path.relative_to(root)}: {link}")
    assert seen > 10  # the pattern finds the references there are
    assert missing == []


def _names_imported_from(path: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.setdefault(node.module, set()).update(a.name for a in node.names)
    return out


def test_the_trainer_reaches_heads_through_the_registry_and_writes_no_export():
    """Per-head behaviour lives in the heads (DraftHead's methods): the trainer imports no head module or
    class, only the registry's functions, and from export.py only the reader of existing drafts."""
    imported = _names_imported_from(PACKAGE / "trainer.py")
    assert not [m for m in imported if m.startswith("eagle_online.heads.")]
    assert imported["eagle_online.heads"] <= {"architecture_of", "build_head", "draft_config", "drafter_for"}
    assert imported.get("eagle_online.export", set()) <= {"load_draft"}
