"""The README and docs/*.md, run: docs that cannot drift.

``test_page_runs`` runs each page's fenced code blocks in order, one page a
test, in a scratch folder (``tmp_path``, the working directory while it runs):

- every ```` ```python ```` block, all of a page's blocks in one namespace
  (as a reader pastes them one after the other into one interpreter);
- every shell block (``sh``, ``bash``, ``shell``) whose fence says ``run``
  (```` ```sh run ````), with ``bash -e -o pipefail``, ``python`` being this
  interpreter (its folder first on ``PATH``, as after ``source
  .venv/bin/activate``); a shell block without ``run`` is not run.

A block that is not meant to run says so, with the reason, in its fence
(```` ```python no-run: needs a CUDA GPU ````) or in an HTML comment on the
line right before it (``<!-- no-run: needs a CUDA GPU -->``; a fence that says
only ``no-run`` takes its reason from such a comment); pytest's summary
lists every block not run, with its page, line and reason ("docs blocks not
run"). A ``no-run`` without a reason fails the page, and so does a would-be
fence whose info string holds a backtick (CommonMark, and so GitHub, then
renders no code block at all). Other languages (``cpp``, plain fences) and
indented blocks are text, never run.

A block that fails is reported with its page, the line of its fence, the line
that failed and the error; the page's later blocks still run, so one test
reports every failing block of its page.

What is not run yet is listed in one place, ``NOT_RUN_YET``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Every page: the README, then docs/*.md in name order.
PAGES = ["README.md"] + sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))

#: What this test does not run yet, and why: page -> (the heading whose
#: section is left out, or None for the whole page; the reason).
NOT_RUN_YET: Dict[str, Tuple[Optional[str], str]] = {}

SHELLS = ("sh", "bash", "shell")
#: Seconds a shell block may take (the cheap ones run here take a few).
SHELL_TIMEOUT_S = 180

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`]*)$")
#: A would-be fence whose info string holds a backtick: CommonMark (and GitHub) do not take it as a fence.
_BROKEN_FENCE = re.compile(r"^ {0,3}`{3,}[^`]*`")
_COMMENT = re.compile(r"^\s*<!--\s*(.*?)\s*-->\s*$")
_NO_RUN = re.compile(r"^no-run\b[\s:]*(.*)$")


@dataclasses.dataclass
class Block:
    """One fenced code block of a page."""

    page: str
    line: int  # 1-based line of the opening fence
    language: str
    flags: str  # the info string after the language
    comment: str  # an HTML comment on the line right before the fence ("" if none)
    heading: str  # the nearest "## " heading above it ("" if none)
    code: str
    problem: str = ""  # set where the fence itself is wrong

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def plan(self) -> Tuple[str, str]:
        """("run", ""), ("skip", reason), ("bad", why) or ("text", "")."""
        if self.problem:
            return "bad", f"{self.where}: {self.problem}"
        marks = [m for m in (self.flags, self.comment) if m]
        in_fence, in_comment = _NO_RUN.match(self.flags), _NO_RUN.match(self.comment)
        if in_fence or in_comment:
            # The reason: after no-run in the fence, else in the comment (`<!-- no-run: REASON -->`, or any
            # comment right before a fence that says no-run).
            reason = (in_fence.group(1) if in_fence else "").strip() or (
                in_comment.group(1) if in_comment else self.comment).strip()
            if not reason:
                return "bad", f"{self.where}: the block says no-run but not why (write `no-run: REASON`)"
            return "skip", reason
        if self.language == "python":
            return "run", ""
        if self.language in SHELLS:
            if any(mark.split()[0] == "run" for mark in marks):
                return "run", ""
            return "skip", "a shell block not marked `run`"
        return "text", ""


def read_blocks(path: Path, page: str) -> List[Block]:
    """The fenced code blocks of the Markdown file ``path`` (named ``page`` in reports), in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: List[Block] = []
    heading = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            heading = line.strip()
        fence = _FENCE.match(line)
        if not fence:
            if _BROKEN_FENCE.match(line):
                blocks.append(Block(page, i + 1, "", "", "", heading, "",
                                    "a fence's info string cannot hold a backtick (it is then no fence at all)"))
            i += 1
            continue
        marker, info = fence.group(1), fence.group(2).strip()
        language, _, flags = info.partition(" ")
        previous = lines[i - 1] if i > 0 else ""
        comment = _COMMENT.match(previous)
        end = i + 1
        while end < len(lines) and not (lines[end].strip().startswith(marker[0] * len(marker))
                                        and set(lines[end].strip()) == {marker[0]}):
            end += 1
        blocks.append(Block(page, i + 1, language.lower(), flags.strip(), comment.group(1) if comment else "",
                            heading, "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


def shell_env() -> Dict[str, str]:
    """The environment of a shell block: as after ``source .venv/bin/activate`` with this interpreter's venv."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = sys.prefix
    env["MPLBACKEND"] = "Agg"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONHOME", None)
    return env


def _python_failure(block: Block, source_name: str, exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == source_name]
    failed_at = f" at {block.page}:{frames[-1].lineno}" if frames else ""
    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-12:]).rstrip()
    return (f"{block.where}: the python block failed{failed_at}: {type(exc).__name__}: {exc}\n"
            + "\n".join("    " + line for line in detail.splitlines()))


def run_python(block: Block, namespace: dict, source_name: str) -> Optional[str]:
    """Exec ``block`` in ``namespace``; line numbers in tracebacks are the page's. None, or the failure."""
    source = "\n" * block.line + block.code  # the code's first line is the line after the fence
    try:
        exec(compile(source, source_name, "exec"), namespace)
    except Exception as exc:  # noqa: BLE001  (every error of a block is a finding)
        return _python_failure(block, source_name, exc)
    return None


def run_shell(block: Block, cwd: Path) -> Optional[str]:
    """Run ``block`` with bash in ``cwd``. None, or the failure (the page line that failed, the output's end)."""
    script = "trap 'echo \"docs-test: failed at block line $((LINENO - 1))\" >&2' ERR\n" + block.code
    try:
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=shell_env(),
                              capture_output=True, text=True, timeout=SHELL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"{block.where}: the shell block ran past {SHELL_TIMEOUT_S} s"
    if proc.returncode == 0:
        return None
    found = re.search(r"docs-test: failed at block line (\d+)", proc.stderr)
    failed_at = f" at {block.page}:{block.line + int(found.group(1))}" if found else ""
    output = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return (f"{block.where}: the shell block failed{failed_at} (exit status {proc.returncode}):\n"
            + "\n".join("    " + line for line in output))


def run_page(path: Path, page: str, cwd: Path, skip_section: Optional[Tuple[str, str]] = None
             ) -> Tuple[List[str], List[str], int]:
    """Run the page's blocks in order: (failures, blocks not run with their reasons, blocks run)."""
    namespace: dict = {"__name__": "__docs__"}
    failures: List[str] = []
    not_run: List[str] = []
    ran = 0
    for block in read_blocks(path, page):
        action, reason = block.plan()
        if action in ("run", "skip") and skip_section and block.heading.startswith(skip_section[0]):
            action, reason = "skip", f"not run yet: {skip_section[1]}"
        if action == "bad":
            failures.append(reason)
        elif action == "skip":
            not_run.append(f"{block.where} ({block.language}): {reason}")
        elif action == "run":
            ran += 1
            failure = (run_python(block, namespace, str(path)) if block.language == "python"
                       else run_shell(block, cwd))
            if failure:
                failures.append(failure)
    return failures, not_run, ran


# --------------------------------------------------------------------------
# Every page.


@pytest.mark.timeout(300)
# The README's blocks train and export (about 19 s): slow, as make check counts it.
@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p == "README.md" else p for p in PAGES])
def test_page_runs(page, tmp_path, monkeypatch, record_property):
    section, reason = NOT_RUN_YET.get(page, ("", ""))
    if section is None:
        pytest.skip(f"{page}: not run yet: {reason}")
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    threads = torch.get_num_threads()
    try:
        failures, not_run, ran = run_page(REPO / page, page, tmp_path, (section, reason) if section else None)
    finally:
        torch.set_num_threads(threads)
    for entry in not_run:
        record_property("docs_not_run", entry)
    print(f"{page}: {ran} blocks run; not run: {len(not_run)}", *not_run, sep="\n  ")
    assert not failures, f"{len(failures)} block(s) of {page} failed:\n\n" + "\n\n".join(failures)


# --------------------------------------------------------------------------
# The runner itself.


FAKE_PAGE = """\
# A page

```python
x = 1
```

```python
y = x + undefined_name
```

<!-- no-run: shows a failure on purpose -->
```python
raise SystemExit
```

```python no-run
pass
```

```python no-run: a `backtick` here breaks the fence
<!-- needs a GPU -->
```python no-run
import this_needs_a_gpu
```

```sh run
true
false
```

```sh
exit 1
```

```cpp
not run
```
"""


def test_the_runner_reports_page_line_and_error(tmp_path):
    page = tmp_path / "fake.md"
    page.write_text(FAKE_PAGE)
    failures, not_run, ran = run_page(page, "fake.md", tmp_path)
    assert ran == 3  # two python blocks, the `sh run` one
    assert failures[0].startswith("fake.md:7: the python block failed at fake.md:8: NameError"), failures[0]
    assert "undefined_name" in failures[0]
    assert failures[1] == "fake.md:16: the block says no-run but not why (write `no-run: REASON`)"
    assert failures[2] == "fake.md:20: a fence's info string cannot hold a backtick (it is then no fence at all)"
    assert failures[3].startswith("fake.md:26: the shell block failed at fake.md:28 (exit status 1)"), failures[3]
    assert len(failures) == 4
    assert not_run == ["fake.md:12 (python): shows a failure on purpose",
                       "fake.md:22 (python): needs a GPU",
                       "fake.md:31 (sh): a shell block not marked `run`"]


# --------------------------------------------------------------------------
# What the README says, held to what is true.

README = (REPO / "README.md").read_text(encoding="utf-8")


def _section(heading: str) -> str:
    start = README.index(heading)
    end = README.find("\n## ", start + len(heading))
    return README[start:] if end < 0 else README[start:end]


def test_readme_says_how_to_run_commands_before_the_first_one():
    before = README[:README.index("```")]
    assert "source .venv/bin/activate" in before and ".venv/bin/python" in before, before


@pytest.mark.slow  # a CMake configure (about 11 s)
@pytest.mark.timeout(300)
def test_readme_cmake_line_configures_as_written(tmp_path):
    """The README's CMake configure command, run as written from the repository root (the build folder
    moved into tmp_path), with the venv active: it must find LibTorch and, with a CUDA torch, CUDA."""
    block = next(b for b in read_blocks(REPO / "README.md", "README.md")
                 if b.language in SHELLS and "cmake -S" in b.code)
    configure = block.code.split("\ncmake --build")[0].strip()
    assert "scripts/cmake_cuda_args.py" in configure  # what `make build-cpp` passes too (Makefile, CMAKE_ARGS)
    if shutil.which("cmake", path=shell_env()["PATH"]) is None:
        pytest.skip("no cmake here")
    command = configure.replace("-B build-cmake", f"-B {tmp_path / 'build-cmake'}")
    proc = subprocess.run(["bash", "-e", "-c", command], cwd=REPO, env=shell_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"README.md:{block.line}: {command}\n" + (proc.stdout + proc.stderr)[-3000:]


#: A measured figure: a decimal with %, x or ms (98.89%, 1.17x, 19.7 ms).
_FIGURE = re.compile(r"\b\d+\.\d+ ?(?:%|x\b|ms\b)")


def test_readme_quotes_no_measured_figure():
    """Each measured figure is quoted once: in its docs page, with the command, date and machine load.
    The README links the pages."""
    hits = [line.strip() for line in README.splitlines() if _FIGURE.search(line)]
    assert not hits, "figures in README.md that belong in a docs page:\n" + "\n".join(hits)


def test_readme_names_every_model():
    from torch_ext import models

    names = models.list_models()
    models_section = _section("## Models, weight quantizers, training")
    comment = re.search(r"list_models\(\)\s*#(.*?)\n(?!\s*#)", models_section, re.S)
    assert comment, "the README's list_models() line has no comment"
    listed = re.findall(r"[a-z_0-9]+", comment.group(1).replace("#", " "))
    assert [n for n in listed if n in names or n.endswith("_quantize")] == names, comment.group(1)


def test_readme_and_help_give_the_data_layouts():
    from torch_ext.train.config import build_parser

    help_text = " ".join(build_parser().format_help().split())
    for text in (README, help_text):
        assert "data_batch_1" in text and "test_batch" in text  # cifar10
        assert "<class>" in text and "train/<class>" in text  # image_folder: split, or train/ and test/


def test_readme_states_this_files_test_count():
    # A test a page (a new docs page needs no edit here or in the README) and the others.
    others = sum(1 for name in globals() if name.startswith("test_") and name != "test_page_runs")
    found = re.search(r"`tests/test_docs\.py` \(a test a page\s+and (\d+) more", README)
    assert found and int(found.group(1)) == others, (found and found.group(0), others)
