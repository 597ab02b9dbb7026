"""The repository stands on its own: no path outside it, links that resolve,
the code kept in readable pieces (no source file over 600 lines, no function
over 80), and no import circle in the package.
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


# --------------------------------------------------------------------------
# Readable pieces: every product source (the package, the C++ and CUDA, the
# scripts, examples and benchmarks; the tests are not held to it).

MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
SOURCE_SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".sh"}


def _product_sources():
    tops = ("torch_ext", "csrc", "cuda", "scripts", "examples", "benchmarks")
    return sorted(f for f in _tracked_files() if f.suffix in SOURCE_SUFFIXES and
                  (f.relative_to(REPO).parts[0] in tops or f.relative_to(REPO) == Path("setup.py")))


def _strip_cxx(text: str) -> str:
    """C++ without comments, string and character literals (line breaks kept)."""
    pattern = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)
    return pattern.sub(lambda m: "\n" * m.group().count("\n") if m.group()[0] == "/" else '""', text)


_CONTROL = re.compile(r"\b(if|for|while|switch|catch|do|else|try)\s*(\(|$)")
_SCOPE = re.compile(r"\b(namespace|class|struct|union|enum|extern\s*\"\")\b[^;(){}]*$")


def _cxx_functions(text: str):
    """(name, lines) of each function body at namespace or class scope.

    A block is a function when the text before its brace ends with a
    parameter list (a macro such as TORCH_LIBRARY_FRAGMENT(torch_ext, m)
    counts too); lambdas and control blocks inside it count toward it.
    """
    code = _strip_cxx(text)
    stack, head = [], ""
    line = 1
    for ch in code:
        if ch == "\n":
            line += 1
        if ch == "{":
            before = head.strip()
            outer = all(kind == "scope" for kind, _, _ in stack)
            if outer and _SCOPE.search(before):
                stack.append(("scope", before, line))
            elif outer and re.search(r"\)\s*(const|noexcept|override|final|->[^{;]*|\s)*$", before) \
                    and not _CONTROL.search(before.splitlines()[-1] if before else ""):
                name = re.findall(r"([~\w:]+)\s*\(", before)
                stack.append(("function", name[0] if name else before[:40], line))
            else:
                stack.append(("block", before, line))
            head = ""
        elif ch == "}":
            if stack:
                kind, name, start = stack.pop()
                if kind == "function":
                    yield name, line - start + 1
            head = ""
        elif ch == ";":
            head = ""
        else:
            head += ch


def test_the_cxx_function_finder_sees_functions_not_blocks():
    text = ("namespace a {\nint f(int x) {\n  if (x) {\n    return 1;\n  }\n  auto g = [&](int y) {\n"
            "    return y;\n  };\n  return g(x);\n}\nstruct S {\n  void m() const { }\n};\n}  // } {\n"
            "TORCH_LIBRARY_FRAGMENT(torch_ext, m) {\n  m.def(\"a(Tensor x) -> Tensor\");\n}\n")
    assert list(_cxx_functions(text)) == [("f", 9), ("m", 1), ("TORCH_LIBRARY_FRAGMENT", 3)]


def test_no_source_file_is_over_600_lines():
    long = [(str(f.relative_to(REPO)), n) for f in _product_sources()
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES]
    assert not long, long


def test_no_function_is_over_80_lines():
    long = []
    for f in _product_sources():
        text = f.read_text(encoding="utf-8")
        if f.suffix == ".py":
            found = _functions(f)
        elif f.suffix == ".sh":
            continue
        else:
            found = _cxx_functions(text)
        long += [(str(f.relative_to(REPO)), name, n) for name, n in found if n > MAX_FUNCTION_LINES]
    assert not long, long


def test_every_operator_family_has_its_files_named_alike():
    """A family is csrc/ops/<family>.cpp (schemas, checks, C++ API, autograd) and
    torch_ext/ops/<family>.py (Python API, fake kernels, torch.func); its kernels'
    files (csrc/cpu/, csrc/composite/, cuda/) start with its name (docs/adding_an_op.md)."""
    cxx = {p.stem for p in (REPO / "csrc" / "ops").glob("*.cpp")}
    python = {p.stem for p in (REPO / "torch_ext" / "ops").glob("*.py") if not p.name.startswith("_")}
    assert cxx >= {"quantize", "learnable", "packed", "weight_quantization"}, cxx
    assert cxx == python, (sorted(cxx - python), sorted(python - cxx))
    kernels = [p for folder in ("csrc/cpu", "csrc/composite", "cuda") for p in (REPO / folder).rglob("*")
               if p.suffix in (".cpp", ".cu")]
    orphans = [str(p.relative_to(REPO)) for p in kernels if not any(p.stem.startswith(f + "_") for f in cxx)]
    assert kernels and not orphans, orphans
    # No schema outside a family's file: one TORCH_LIBRARY_FRAGMENT a family.
    for path in sorted((REPO / "csrc").rglob("*.cpp")):
        text = path.read_text(encoding="utf-8")
        assert "TORCH_LIBRARY(" not in text, path
        if "TORCH_LIBRARY_FRAGMENT(" in text:
            assert path.parent.name == "ops", path

