"""The project's layout: imports run one way (no module imports one that imports it back, at any
depth, function-level imports included), and what a module takes from another is defined there,
not passed along (one home for each name; generate's re-exports of Request/Result excepted)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(ROOT.glob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
OURS = {f.stem for f in FILES}
REEXPORTS = {("generate", "Request"), ("generate", "Result")}  # the README's `from generate import ...`


def uses(path: Path) -> dict[str, set[str]]:
    """{our module: names taken from it (by `from m import x` or `alias.x`)}."""
    tree, out, alias = ast.parse(path.read_text()), {}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in OURS:
                    out.setdefault(a.name, set())
                    alias[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module in OURS and not node.level:
            out.setdefault(node.module, set()).update(a.name for a in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in alias:
            out[alias[node.value.id]].add(node.attr)
    out.pop(path.stem, None)
    return out


def defined(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_imports_run_one_way():
    graph = {f.stem: set(uses(f)) for f in FILES}

    def reach(m, seen):
        for n in graph.get(m, ()):
            if n not in seen:
                seen.add(n)
                reach(n, seen)
        return seen

    cycles = [m for m in graph if m in reach(m, set())]
    assert not cycles, f"modules that import themselves back: {cycles}"
    assert graph["model"] == set()  # the model at the bottom
    assert not any("generate" in graph[m] for m in ("model", "tp", "sampling", "stats", "cli", "tokenizer",
                                                      "convert_checkpoint"))
    assert not any("quantize" in graph[m] for m in graph)  # the converter's sibling: nothing imports it back


def test_names_are_taken_from_their_home():
    homes = {f.stem: defined(f) for f in FILES}
    bad = []
    for f in FILES + sorted((ROOT / "tests").glob("*.py")):
        for mod, names in uses(f).items():
            bad += [f"{f.relative_to(ROOT)}: {mod}.{n}" for n in names
                    if n not in homes[mod] and (mod, n) not in REEXPORTS and n != "__file__"]
    assert not bad, bad
