"""The repository stands on its own: no path outside it, links that resolve,
the training package kept in readable pieces, and no import circle in the package.
"""

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tracked_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = [REPO / line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist, say)
        files = [p for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts and "build" not in p.parts[0]]
    return [f for f in files if f.is_file() and f.suffix not in (".png", ".so", ".pt")]


def test_nothing_points_outside_the_repository():
    # The contract lives in docs/quantizer.md; a sibling folder of the
    # checkout is not there for people who clone or pip-install the project.
    outside = re.compile(r"\.\./" + "shared|" + "SPEC" + r"\.md")
    hits = []
    for path in _tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if outside.search(line):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("page", ["README.md", "docs/quantizer.md"])
def test_relative_links_resolve(page):
    text = (REPO / page).read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    relative = [link for link in links if "://" not in link and not link.startswith("mailto:")]
    missing = [link for link in relative if not (REPO / page).parent.joinpath(link).exists()]
    assert not missing, f"{page} links to missing files: {missing}"


def test_readme_links_the_contract():
    assert "](docs/quantizer.md)" in (REPO / "README.md").read_text(encoding="utf-8")


def _functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_training_package_has_no_long_function():
    files = sorted((REPO / "torch_ext" / "train").glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "__main__.py", "config.py", "run.py", "loop.py",
                                        "checkpoint.py", "distributed.py", "report.py"}
    long = [(f.name, name, n) for f in files for name, n in _functions(f) if n > 80]
    assert not long, long


def _imports_of(path: Path, package: str) -> set:
    """The torch_ext modules a module imports anywhere (lazy imports inside functions included)."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n == package or n.startswith(package + "."))
    return found


def test_the_package_import_graph_has_no_circle():
    """No module of torch_ext imports, even lazily, a module that comes back to it."""
    modules = {}
    for path in sorted((REPO / "torch_ext").rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    graph = {name: {m for m in _imports_of(path, "torch_ext") if m in modules and m != name}
             for name, path in modules.items()}
    # The package itself (torch_ext/__init__.py) is everyone's parent: leave it out.
    graph = {name: edges - {"torch_ext"} for name, edges in graph.items() if name != "torch_ext"}
    # A package's __init__ importing its own modules is not a circle through them.
    circles = []
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
