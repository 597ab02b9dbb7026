"""scripts/gpu_check.sh and scripts/check_junit.py, tested where no GPU is needed.

The GPU check runs on a borrowed GPU machine, where a wasted minute is not
given back; everything it can get wrong without a GPU is checked here: its
syntax, its time budget, that it fails fast (and says why) without a GPU, the
CUDA toolkit it picks behind an nvcc wrapper script, the C++ compiler it and
setup.py accept (one that links libstdc++ shared), that its pytest step
selects every CUDA test, that its bench step's commands name the benchmarks
(``benchmarks/``) and options that exist, and the JUnit checker that keeps it
from passing by skipping.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
CHECK_JUNIT = ROOT / "scripts" / "check_junit.py"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

#: The device tool's limits (scripts/gpu_check.sh's header): 600 s a command,
#: 15 minutes of device time a session, machine start-ups included.
PER_COMMAND_S = 600
SESSION_S = 15 * 60
WHOLE_CHECK_LIMIT_S = 8 * 60
#: A machine start-up, counted twice: the first run and a rerun on a fresh machine.
START_UP_S = 120


def run_script(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120):
    return subprocess.run(
        [BASH, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def header_steps() -> dict[str, tuple[int, int, bool]]:
    """{step: (budget s, expected s, in the default run)} from the script's header."""
    steps = {}
    for line in SCRIPT.read_text().splitlines():
        m = re.match(r"^#   step (\w+) +(\d+) s +expect +(\d+) s: (.*)$", line)
        if m:
            steps[m.group(1)] = (int(m.group(2)), int(m.group(3)), "not a default step" not in m.group(4))
    return steps


def default_steps() -> list[str]:
    m = re.search(r"^DEFAULT_STEPS=\(([^)]*)\)", SCRIPT.read_text(), re.MULTILINE)
    assert m, "DEFAULT_STEPS=(...) not found in gpu_check.sh"
    return m.group(1).split()


def test_bash_syntax():
    r = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_budget_header_fits_the_device_limits():
    steps = header_steps()
    run = ["preflight"] + default_steps()
    assert set(run) <= set(steps), f"steps without a budget line: {set(run) - set(steps)}"
    assert {name for name, (_, _, default) in steps.items() if default} == set(run), "header and DEFAULT_STEPS disagree"
    total = sum(steps[name][0] for name in run)
    # The whole default run is under 8 minutes, each step is killed at its budget.
    assert total < WHOLE_CHECK_LIMIT_S, f"the default steps' budgets sum to {total} s"
    stated = re.search(r"default steps sum to (\d+) s", SCRIPT.read_text())
    assert stated and int(stated.group(1)) == total, "the header's stated sum is not the sum of its budgets"
    for name, (budget, expected, _) in steps.items():
        assert 0 < expected < budget < PER_COMMAND_S, f"{name}: expect {expected} s, budget {budget} s"
    # Room to rerun the longest default step on a fresh machine, both start-ups counted.
    longest = max(steps[name][0] for name in run)
    assert total + longest + 2 * START_UP_S <= SESSION_S


def test_list_shows_the_budgets():
    r = run_script("--list")
    assert r.returncode == 0, r.stderr
    for name, (budget, _, _) in header_steps().items():
        assert re.search(rf"^  {name} +{budget} s", r.stdout, re.MULTILINE), r.stdout


def _python_module_commands(step: str) -> list[list[str]]:
    """The ``"$PY" -m MODULE ARGS`` commands of the function ``step_<step>`` of the script, split as bash would."""
    text = SCRIPT.read_text()
    m = re.search(rf"^step_{step}\(\) \{{\n(.*?)^\}}", text, re.MULTILINE | re.DOTALL)
    assert m, f"step_{step}() not found in gpu_check.sh"
    body = m.group(1).replace("\\\n", " ")  # continuation lines joined
    commands = []
    for line in body.splitlines():
        line = line.strip()
        if line.startswith('"$PY" -m '):
            command = line.split("||")[0].replace("$OUT", "/out")
            commands.append(shlex.split(command)[2:])
    return commands


def test_the_bench_step_runs_the_benchmarks_with_options_they_take(monkeypatch):
    """The bench step's commands name modules of benchmarks/ (run from the root) and options their parser takes."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench

    commands = _python_module_commands("bench")
    assert [c[0] for c in commands] == ["benchmarks.bench", "benchmarks.bench"], commands
    assert "--learnable" in commands[1]
    for module, *args in commands:
        assert importlib.util.find_spec(module) is not None, f"gpu_check.sh runs {module}, which does not exist"
        parsed = bench._parser().parse_args(args)
        bench._check_args(parsed)  # the values too: dtypes, layouts, train models
        assert parsed.devices == ["cuda"] and parsed.json.startswith("/out/"), args


def test_unknown_step_is_refused(tmp_path):
    r = run_script(str(tmp_path / "out"), "build", "no_such_step")
    assert r.returncode == 2
    assert "unknown step 'no_such_step'" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the dry run would run the real check")
def test_dry_run_without_gpu_fails_fast_and_says_why(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    started = time.monotonic()
    # A relative OUTDIR: made absolute against the caller's folder before any cd.
    r = run_script("relative/out", env=env, cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - started
    assert r.returncode == 2, r.stdout + r.stderr
    assert elapsed < 30, f"took {elapsed:.0f} s"
    assert "gpu_check: FAILED: no GPU visible to torch (torch.cuda.is_available() is False" in r.stdout
    summary = (tmp_path / "relative" / "out" / "summary.txt").read_text()
    assert "no GPU visible to torch" in summary and "gpu_check: FAILED (preflight" in summary
    assert (tmp_path / "relative" / "out" / "gpu_check.log").exists()
    assert not (ROOT / "relative").exists(), "OUTDIR was made under the repository"
    # No step ran: nothing was built or tested.
    assert "=== build" not in summary


#: A sitecustomize that makes torch report one GPU: enough for the preflight
#: to pass, so that the orchestration after it runs here (no kernel can run).
FAKE_GPU_SITECUSTOMIZE = """
import torch.cuda as cuda
cuda.is_available = lambda: True
cuda.device_count = lambda: 1
cuda.get_device_capability = lambda device=None: (9, 0)
cuda.get_device_name = lambda device=None: "a pretended GPU"
class _Properties:
    total_memory = 141 * 2**30
cuda.get_device_properties = lambda device=None: _Properties()
"""


def _has_toolkit() -> bool:
    return run_script("--find-cuda").returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: no need to pretend one")
@pytest.mark.skipif(shutil.which("compute-sanitizer") is not None, reason="compute-sanitizer is installed here")
def test_a_step_that_cannot_run_makes_the_check_incomplete_not_passed(tmp_path):
    """With a GPU pretended (torch.cuda patched in a sitecustomize), the
    preflight passes and the memcheck step runs: with no compute-sanitizer it
    is UNSUPPORTED, and the check ends INCOMPLETE (exit 3), never PASSED."""
    if not _has_toolkit():
        pytest.skip("no CUDA toolkit here: the preflight would stop first")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_GPU_SITECUSTOMIZE)
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "cuda" not in p)
    out = tmp_path / "out"
    r = run_script(str(out), "memcheck", env=env, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    assert "GPU 0: a pretended GPU, capability 9.0" in summary
    assert "TORCH_CUDA_ARCH_LIST=9.0 (the visible GPU only)" in summary
    assert re.search(r"^CUDA toolkit: /\S+ \(", summary, re.MULTILINE)
    assert re.search(r"^C\+\+ compiler: /\S+ \(.+\), libstdc\+\+ shared \(/\S+\)$", summary, re.MULTILINE)
    assert f"=== memcheck (budget {header_steps()['memcheck'][0]} s)" in summary
    assert "UNSUPPORTED: compute-sanitizer not found" in summary
    assert summary.rstrip().splitlines()[-1].startswith(
        "gpu_check: INCOMPLETE: everything that ran passed; could not run here: memcheck"
    )
    assert "=== build" not in summary, "a step that was not asked for ran"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "summary.txt"]


# --------------------------------------------------------------------------
# The CUDA toolkit behind an nvcc wrapper script.


def make_toolkit(folder: Path, version: str = "99.9", report_here: bool = False) -> Path:
    """A fake CUDA toolkit: bin/nvcc that runs, libcudart, cuda_runtime.h.
    With report_here, its nvcc answers --dryrun with its own folder as the real one does."""
    (folder / "bin").mkdir(parents=True)
    (folder / "lib64").mkdir()
    (folder / "include").mkdir()
    dryrun = f'case " $* " in *" --dryrun "*) echo "#$ _HERE_={folder}/bin" >&2; exit 0;; esac\n' if report_here else ""
    nvcc = folder / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\n{dryrun}echo 'Cuda compilation tools, release {version}'\n")
    nvcc.chmod(0o755)
    (folder / "lib64" / "libcudart.so.99").write_text("")
    (folder / "include" / "cuda_runtime.h").write_text("")
    return folder


def make_wrapper(folder: Path, target: Path) -> Path:
    folder.mkdir(parents=True)
    wrapper = folder / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {target}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    return folder


def finder_env(tmp_path: Path, path: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    env.update(PATH=path, TORCH_EXT_DEFAULT_CUDA=str(tmp_path / "no-default-toolkit"), **extra)
    return env


def found_cuda_home(r) -> str:
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"^CUDA_HOME=(.*)$", r.stdout, re.MULTILINE)
    assert m, r.stdout
    return m.group(1)


def test_find_cuda_follows_a_wrapper_script_to_the_toolkit_it_execs(tmp_path):
    toolkit = make_toolkit(tmp_path / "cuda-99.9")
    wrappers = make_wrapper(tmp_path / "usr-local-bin", toolkit)
    r = run_script("--find-cuda", env=finder_env(tmp_path, f"{wrappers}:/usr/bin:/bin"))
    assert found_cuda_home(r) == str(toolkit)
    assert f"exec'd by the wrapper {wrappers}/nvcc" in r.stdout


def test_find_cuda_asks_nvcc_where_it_is(tmp_path):
    toolkit = make_toolkit(tmp_path / "cuda-99.9", report_here=True)
    wrappers = make_wrapper(tmp_path / "usr-local-bin", toolkit)
    r = run_script("--find-cuda", env=finder_env(tmp_path, f"{wrappers}:/usr/bin:/bin"))
    assert found_cuda_home(r) == str(toolkit)
    assert "--dryrun" in r.stdout


def test_find_cuda_takes_a_valid_cuda_home_first_and_skips_an_invalid_one(tmp_path):
    toolkit = make_toolkit(tmp_path / "cuda-99.9")
    other = make_toolkit(tmp_path / "cuda-98.0", version="98.0")
    wrappers = make_wrapper(tmp_path / "usr-local-bin", toolkit)
    path = f"{wrappers}:/usr/bin:/bin"
    r = run_script("--find-cuda", env=finder_env(tmp_path, path, CUDA_HOME=str(other)))
    assert found_cuda_home(r) == str(other)
    # A CUDA_HOME that is no toolkit (here: a folder with no libcudart, like /usr/local).
    not_toolkit = tmp_path / "usr-local"
    (not_toolkit / "bin").mkdir(parents=True)
    shutil.copy(wrappers / "nvcc", not_toolkit / "bin" / "nvcc")
    r = run_script("--find-cuda", env=finder_env(tmp_path, path, CUDA_HOME=str(not_toolkit)))
    assert found_cuda_home(r) == str(toolkit)


@pytest.mark.skipif(shutil.which("nvcc", path="/usr/bin:/bin") is not None, reason="an nvcc in /usr/bin or /bin")
def test_find_cuda_without_any_toolkit_fails_and_says_what_it_tried(tmp_path):
    r = run_script("--find-cuda", env=finder_env(tmp_path, "/usr/bin:/bin", CUDA_HOME=str(tmp_path / "nowhere")))
    assert r.returncode == 2
    assert "no CUDA toolkit found" in r.stderr
    assert "nowhere ($CUDA_HOME): no such folder" in r.stderr
    assert "no-default-toolkit (the default): no such folder" in r.stderr
    assert "(no nvcc on PATH)" in r.stderr


def _is_wrapper_script(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


@pytest.mark.skipif(
    not (os.path.exists("/usr/local/cuda/bin/nvcc") and _is_wrapper_script("/usr/local/bin/nvcc")),
    reason="this machine has no /usr/local/cuda toolkit behind a /usr/local/bin/nvcc wrapper script",
)
def test_find_cuda_here_picks_usr_local_cuda_behind_the_wrapper():
    """This machine's /usr/local/bin/nvcc is a shell script exec'ing the real
    nvcc, and /usr/local/lib has no libcudart: the folder above the nvcc on
    PATH (/usr/local) is no toolkit, /usr/local/cuda is."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "TORCH_EXT_DEFAULT_CUDA")}
    env["PATH"] = "/usr/local/bin:" + env.get("PATH", "/usr/bin:/bin")
    home = found_cuda_home(run_script("--find-cuda", env=env))
    assert os.path.realpath(home) == os.path.realpath("/usr/local/cuda")
    assert os.path.realpath(home) != "/usr/local"


# --------------------------------------------------------------------------
# The C++ compiler: one that links libstdc++ shared (scripts/cxx_toolchain.py).
# A GCC with only libstdc++.a answers -print-file-name=libstdc++.so with the
# bare name; the extension it links crashes on its first error message.

CXX_TOOLCHAIN = ROOT / "scripts" / "cxx_toolchain.py"


def make_compiler(folder: Path, libstdcxx: Path | None) -> Path:
    """A fake GCC in folder/bin (g++ and gcc, bash): -print-file-name=libstdc++.so answers ``libstdcxx``
    (an existing file: it links libstdc++ shared) or, with None, the bare name (static-only); it
    answers --version and -dumpfullversion, and refuses to compile anything."""
    (folder / "bin").mkdir(parents=True)
    if libstdcxx is not None:
        libstdcxx.parent.mkdir(parents=True, exist_ok=True)
        libstdcxx.write_text("/* GNU ld script */\n")
    answer = str(libstdcxx) if libstdcxx is not None else '${1#-print-file-name=}'
    script = (
        f"#!{BASH}\n"
        'case "$1" in\n'
        f'  -print-file-name=*) echo "{answer}" ;;\n'
        '  --version) echo "g++ (fake) 13.3.0"; echo "Copyright (C) 2024 Free Software Foundation, Inc." ;;\n'
        "  -dumpfullversion) echo 13.3.0 ;;\n"
        '  *) echo "fake g++: not compiling: $*" >&2; exit 1 ;;\n'
        "esac\n"
    )
    for name in ("g++", "gcc"):
        (folder / "bin" / name).write_text(script)
        (folder / "bin" / name).chmod(0o755)
    return folder / "bin" / "g++"


@pytest.fixture
def compilers(tmp_path) -> tuple[Path, Path]:
    """(a static-only g++, as under /opt/gcc; a g++ that links libstdc++ shared)."""
    return (make_compiler(tmp_path / "opt-gcc", None),
            make_compiler(tmp_path / "good-gcc", tmp_path / "good-gcc" / "lib" / "libstdc++.so"))


def cxx_env(tmp_path: Path, path: str, **extra: str) -> dict:
    """The environment with no CXX/CC of its own, PATH as given, this Python as gpu_check.sh's, and the
    system's compilers (/usr/bin/g++, /usr/bin/c++) replaced by a path that does not exist."""
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    env.update(PATH=path, PYTHON=sys.executable, TORCH_EXT_SYSTEM_CXX=str(tmp_path / "no-system-cxx"))
    env.update(extra)
    return env


def tools_without_compilers(tmp_path: Path) -> Path:
    """A folder of links to the programs gpu_check.sh --find-cxx runs besides python: no compiler."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("dirname", "basename"):
        (tools / name).symlink_to(shutil.which(name))
    return tools


def static_only_line(cxx: Path, found: str) -> str:
    return (f"torch_ext: the C++ compiler {cxx} has no shared libstdc++ ({cxx} -print-file-name=libstdc++.so "
            "finds none): an extension built with it crashes on its first error message; build with "
            f"CXX=/usr/bin/g++ (found: {found})")


def toolchain_module():
    """scripts/cxx_toolchain.py, loaded as setup.py loads it."""
    spec = importlib.util.spec_from_file_location("cxx_toolchain", CXX_TOOLCHAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cxx_toolchain_check_tells_a_static_only_compiler_from_a_shared_one(tmp_path, compilers):
    static, good = compilers
    env = cxx_env(tmp_path, f"{good.parent}:/usr/bin:/bin")
    r = subprocess.run([sys.executable, str(CXX_TOOLCHAIN), "--check", str(static)], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.splitlines() == [static_only_line(static, str(good))]
    # The compiler in use: $CXX.
    r = subprocess.run([sys.executable, str(CXX_TOOLCHAIN), "--check"], capture_output=True, text=True,
                       env=dict(env, CXX=str(static)))
    assert r.returncode == 1 and r.stdout.startswith(f"torch_ext: the C++ compiler {static} has no shared")
    r = subprocess.run([sys.executable, str(CXX_TOOLCHAIN), "--check"], capture_output=True, text=True,
                       env=dict(env, CXX=str(good)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        f"torch_ext: the C++ compiler {good} (GCC 13.3.0) links libstdc++ shared "
        f"({good.parent.parent}/lib/libstdc++.so)"
    ]
    # One that cannot be run is said to be so (exit 2), not taken for static-only.
    r = subprocess.run([sys.executable, str(CXX_TOOLCHAIN), "--check", str(tmp_path / "none" / "g++")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "cannot be run" in r.stdout and len(r.stdout.splitlines()) == 1, r.stdout


def test_find_shared_cxx_skips_the_static_only_compiler(tmp_path, compilers, monkeypatch):
    static, good = compilers
    toolchain = toolchain_module()
    assert toolchain.links_shared_libstdcxx(str(good)) is True
    assert toolchain.links_shared_libstdcxx(str(static)) is False
    with pytest.raises(toolchain.CompilerError, match="cannot be run"):
        toolchain.links_shared_libstdcxx(str(tmp_path / "none" / "g++"))
    tried: list = []
    assert toolchain.find_shared_cxx([str(tmp_path / "none" / "g++"), str(static), str(good)], tried) == str(good)
    assert tried == [f"{tmp_path}/none/g++: not found",
                     f"{static}: no shared libstdc++ ({static} -print-file-name=libstdc++.so finds none)"]
    assert toolchain.find_shared_cxx([str(static)]) is None
    assert toolchain.matching_cc(str(good)) == str(good.parent / "gcc")
    # The default candidates: $CXX, the system's, g++ and c++ on PATH.
    monkeypatch.setenv("CXX", str(static))
    monkeypatch.setenv("TORCH_EXT_SYSTEM_CXX", str(tmp_path / "no-system-cxx"))
    monkeypatch.setenv("PATH", f"{good.parent}:/usr/bin:/bin")
    assert toolchain.compiler_in_use() == str(static)
    assert toolchain.default_candidates()[:3] == [str(static), str(tmp_path / "no-system-cxx"), str(good)]
    assert toolchain.find_shared_cxx() == str(good)
    # As a script: the path, or one line saying why there is none.
    r = subprocess.run([sys.executable, str(CXX_TOOLCHAIN), "--find"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f"{good}\n", r.stdout + r.stderr
    env = cxx_env(tmp_path, str(static.parent), CXX=str(static))
    r = subprocess.run([sys.executable, str(CXX_TOOLCHAIN), "--find"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("no C++ compiler links libstdc++ shared; tried: ")


def _build_ext(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """setup.py build_ext into tmp_path, the CPU kernels only (no nvcc)."""
    full = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC", "TORCH_EXT_ALLOW_STATIC_LIBSTDCXX")}
    full.update(FORCE_CUDA="0", MAX_JOBS="1", TORCH_EXT_SYSTEM_CXX=str(tmp_path / "no-system-cxx"), **env)
    return subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "temp"),
         "--build-lib", str(tmp_path / "lib")],
        capture_output=True, text=True, cwd=ROOT, env=full, timeout=300,
    )


def test_setup_refuses_a_static_only_compiler_before_compiling(tmp_path, compilers):
    static, good = compilers
    # The fake good g++ first on PATH (the first good compiler found), ninja from this Python's folder.
    path = os.pathsep.join([str(good.parent), os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")])
    r = _build_ext(tmp_path, CXX=str(static), PATH=path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.splitlines()[-1] == static_only_line(static, str(good)), r.stderr
    assert "not compiling" not in r.stdout + r.stderr, "a compile was started"
    assert not (tmp_path / "temp").exists() or not any((tmp_path / "temp").rglob("*.o"))
    # TORCH_EXT_ALLOW_STATIC_LIBSTDCXX=1: the check lets it through; the (fake) compiler is then run.
    r = _build_ext(tmp_path, CXX=str(static), PATH=path, TORCH_EXT_ALLOW_STATIC_LIBSTDCXX="1")
    output = r.stdout + r.stderr
    assert r.returncode != 0 and "has no shared libstdc++ (" not in output, output
    assert f"torch_ext: TORCH_EXT_ALLOW_STATIC_LIBSTDCXX=1: building with {static}, which has no shared" in output
    assert "fake g++: not compiling: " in output, output[-3000:]
    # A compiler that links libstdc++ shared passes the check.
    r = _build_ext(tmp_path, CXX=str(good), PATH=path)
    output = r.stdout + r.stderr
    assert "libstdc++" not in output and "fake g++: not compiling: " in output, output[-3000:]


def test_find_cxx_switches_from_a_static_only_cxx_to_the_first_good_compiler(tmp_path, compilers):
    static, good = compilers
    r = run_script("--find-cxx", env=cxx_env(tmp_path, f"{good.parent}:/usr/bin:/bin", CXX=str(static)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        f"CXX={good}",
        f"CC={good.parent / 'gcc'}",
        f"why: switched from {static} ($CXX): it has no shared libstdc++ ({static} -print-file-name=libstdc++.so "
        "finds none): an extension built with it crashes on its first error message",
        f"compiler: {good} (GCC 13.3.0), libstdc++ shared ({good.parent.parent}/lib/libstdc++.so)",
    ]
    # The system's compiler (here the fake good one) before a static-only g++ first on PATH.
    env = cxx_env(tmp_path, f"{static.parent}:/usr/bin:/bin", CXX=str(static), TORCH_EXT_SYSTEM_CXX=str(good))
    r = run_script("--find-cxx", env=env)
    assert r.returncode == 0 and r.stdout.startswith(f"CXX={good}\nCC={good.parent / 'gcc'}\n"), r.stdout + r.stderr
    # A good $CXX is kept, CC untouched.
    r = run_script("--find-cxx", env=cxx_env(tmp_path, f"{static.parent}:/usr/bin:/bin", CXX=str(good)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[:2] == [f"CXX={good}", f"why: kept {good} ($CXX): it links libstdc++ shared"]


def test_find_cxx_without_a_good_compiler_fails_and_says_why(tmp_path, compilers):
    static, _ = compilers
    path = f"{static.parent}:{tools_without_compilers(tmp_path)}"
    r = run_script("--find-cxx", env=cxx_env(tmp_path, path, CXX=str(static)))
    assert r.returncode == 2 and r.stdout == "", r.stdout
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"no C++ compiler links libstdc++ shared: {static} ($CXX): it has no shared libstdc++ ")
    assert f"tried: {static}: no shared libstdc++" in line and f"{tmp_path}/no-system-cxx: not found" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: no need to pretend one")
@pytest.mark.skipif(shutil.which("compute-sanitizer") is not None, reason="compute-sanitizer is installed here")
@pytest.mark.slow  # a CPU build of the extension (about 14 s)
def test_preflight_builds_with_a_good_compiler_and_says_so(tmp_path, compilers):
    """With a GPU pretended, $CXX static-only: the preflight switches CXX and CC and prints why
    (summary.txt); with no good compiler anywhere it fails (exit 2) before any step."""
    if not _has_toolkit():
        pytest.skip("no CUDA toolkit here: the preflight would stop first")
    static, good = compilers
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_GPU_SITECUSTOMIZE)
    pythonpath = os.pathsep.join([str(site), str(ROOT)])
    system_path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if "cuda" not in p)
    env = cxx_env(tmp_path, f"{good.parent}:{system_path}", CXX=str(static), PYTHONPATH=pythonpath)
    out = tmp_path / "out"
    r = run_script(str(out), "memcheck", env=env, timeout=120)
    summary = (out / "summary.txt").read_text()
    assert (f"C++ compiler: CXX={good} CC={good.parent / 'gcc'}, switched from {static} ($CXX): it has no shared "
            f"libstdc++ ({static} -print-file-name=libstdc++.so finds none)") in summary, summary
    assert f"C++ compiler: {good} (GCC 13.3.0), libstdc++ shared ({good.parent.parent}/lib/libstdc++.so)" in summary
    assert "=== memcheck" in summary, r.stdout + r.stderr
    # No compiler that links libstdc++ shared: the preflight fails, no step runs.
    tools = tools_without_compilers(tmp_path)
    for name in ("timeout", "tee", "grep", "sed", "mktemp", "mkdir", "date", "hostname", "nproc", "rm", "head", "tail"):
        (tools / name).symlink_to(shutil.which(name))
    toolkit = os.path.realpath(found_cuda_home(run_script("--find-cuda")))
    env = cxx_env(tmp_path, f"{static.parent}:{tools}", CXX=str(static), PYTHONPATH=pythonpath,
                  TORCH_EXT_DEFAULT_CUDA=toolkit)
    r = run_script(str(out), "memcheck", env=env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    assert f"no C++ compiler links libstdc++ shared: {static} ($CXX): it has no shared libstdc++" in summary, summary
    assert "gpu_check: FAILED: no C++ compiler that links libstdc++ shared (see above)" in summary
    assert "=== memcheck" not in summary


# --------------------------------------------------------------------------
# The pytest step runs -m cuda: every test that runs on the GPU carries the
# marker (tests/conftest.py sets it on test_cuda.py and on the "cuda" device
# cases; the others write it). Checked by collecting the suite twice, with a
# GPU pretended and with none: a test that runs only where a GPU is (skipped
# without, or collected only with) must be marked.

_MARKS_PLUGIN = """
import json, os, re
import pytest

@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    out = {}
    for item in items:
        skipped = any(not m.args or (not isinstance(m.args[0], str) and bool(m.args[0]))
                      for m in item.iter_markers("skipif")) or any(True for _ in item.iter_markers("skip"))
        node = re.sub(r" at 0x[0-9a-f]+", "", item.nodeid)  # the same id in both runs
        out[node] = {"skipped": skipped, "cuda": item.get_closest_marker("cuda") is not None}
    with open(os.environ["MARKS_OUT"], "w") as f:
        json.dump(out, f)
"""

_GPU_OR_NOT = """
import torch.cuda as cuda
cuda.is_available = lambda: {gpu}
cuda.device_count = lambda: {count}
import torch_ext
torch_ext.built_with_cuda = lambda: {gpu}
"""


def _collected_marks(tmp_path: Path, gpu: bool) -> dict:
    folder = tmp_path / ("gpu" if gpu else "cpu")
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(_GPU_OR_NOT.format(gpu=gpu, count=int(gpu)))
    (folder / "marks_plugin.py").write_text(_MARKS_PLUGIN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), str(ROOT)]), MARKS_OUT=str(folder / "marks.json"))
    r = subprocess.run([sys.executable, "-m", "pytest", "tests", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "-p", "marks_plugin"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((folder / "marks.json").read_text())


@pytest.mark.slow  # collects the whole suite in a second pytest (about 11 s)
def test_every_test_that_needs_a_gpu_is_marked_cuda(tmp_path):
    with_gpu, without = _collected_marks(tmp_path, True), _collected_marks(tmp_path, False)
    unmarked = sorted(
        node for node, m in with_gpu.items()
        if not m["cuda"] and not m["skipped"] and (node not in without or without[node]["skipped"])
    )
    assert not unmarked, f"tests that need a GPU but are not marked cuda (gpu_check.sh would not run them): {unmarked}"
    marked = [node for node, m in with_gpu.items() if m["cuda"]]
    assert all(with_gpu[n]["cuda"] for n in with_gpu if n.startswith("tests/test_cuda.py::"))
    assert not [n for n in marked if n.startswith("tests/test_gpu_check.py::")]
    # Beyond test_cuda.py: the device cases and the tests written with the marker.
    assert any(n.startswith("tests/test_train.py::test_cuda_amp_training") for n in marked)
    assert any(n.startswith("tests/test_codes.py::") and "cuda" in n for n in marked)
    # The pytest step's --min-tests is a floor under what it selects.
    floor = re.search(r'check_junit\.py --min-tests (\d+) "\$OUT/pytest_cuda\.xml"', SCRIPT.read_text())
    assert floor and int(floor.group(1)) <= len(marked), (floor and floor.group(1), len(marked))


# --------------------------------------------------------------------------
# check_junit.py: no passing by skipping.


def junit(*cases: str, errors: int = 0) -> str:
    return "\n".join(
        [
            '<?xml version="1.0" encoding="utf-8"?>',
            f'<testsuites><testsuite name="pytest" errors="{errors}" failures="0" skipped="0" '
            f'tests="{len(cases)}" time="1.0">',
            *cases,
            "</testsuite></testsuites>",
        ]
    )


def passed(name: str) -> str:
    return f'<testcase classname="tests.test_cuda" name="{name}" time="0.1" />'


def skipped(name: str, reason: str) -> str:
    return (
        f'<testcase classname="tests.test_cuda" name="{name}" time="0.0">'
        f'<skipped type="pytest.skip" message="{reason}">tests/test_cuda.py:1: {reason}</skipped></testcase>'
    )


def check_junit(tmp_path: Path, xml: str, *args: str):
    path = tmp_path / "junit.xml"
    path.write_text(xml)
    return subprocess.run([sys.executable, str(CHECK_JUNIT), *args, str(path)], capture_output=True, text=True)


def test_check_junit_allows_only_a_multi_gpu_skip(tmp_path):
    r = check_junit(tmp_path, junit(passed("test_a"), passed("test_b"), skipped("test_second_gpu", "needs two GPUs")))
    assert r.returncode == 0, r.stdout
    assert "2 passed" in r.stdout and "1 skipped (allowed: multi-GPU)" in r.stdout


@pytest.mark.parametrize(
    "reason",
    (
        "no CUDA GPU visible (torch.cuda.is_available() is False)",
        "torch_ext was built without its CUDA kernels (torch_ext.built_with_cuda() is False)",
        "needs Triton (torch.compile's inductor backend on CUDA): triton is not installed",
        "needs 14 GiB of free GPU memory, 3.0 GiB free",
        "needs a GPU",
    ),
)
def test_check_junit_fails_on_any_other_skip(tmp_path, reason):
    r = check_junit(tmp_path, junit(passed("test_a"), skipped("test_grid_stride_loop", reason)))
    assert r.returncode == 1, r.stdout
    assert f"skipped, not allowed: tests.test_cuda::test_grid_stride_loop: {reason}" in r.stdout


def test_check_junit_fails_on_failures_errors_and_too_few_tests(tmp_path):
    failure = '<testcase classname="t" name="f"><failure message="assert 1 == 2">...</failure></testcase>'
    error = '<testcase classname="t" name="e"><error message="fixture broke">...</error></testcase>'
    assert check_junit(tmp_path, junit(passed("a"), failure)).returncode == 1
    assert check_junit(tmp_path, junit(passed("a"), error)).returncode == 1
    # A collection error is counted on the suite, outside any test case.
    assert check_junit(tmp_path, junit(passed("a"), errors=1)).returncode == 1
    # Nothing ran but allowed skips: no pass.
    assert check_junit(tmp_path, junit(skipped("s", "needs two GPUs"))).returncode == 1
    assert check_junit(tmp_path, junit(passed("a"), passed("b")), "--min-tests", "3").returncode == 1
    assert check_junit(tmp_path, junit(passed("a"), passed("b")), "--min-tests", "2").returncode == 0


def test_check_junit_fails_on_pytests_junit_of_an_interrupted_run(tmp_path):
    """gpu_check.sh stops pytest with SIGINT at its limit, so that the JUnit
    file is still written; the test it interrupted must not count as passed."""
    (tmp_path / "test_interrupted.py").write_text(
        "import os, signal, time\n"
        "def test_before(): pass\n"
        "def test_interrupted():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "def test_after(): pass\n"
    )
    xml = tmp_path / "interrupted.xml"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "test_interrupted.py"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert run.returncode == 2, run.stdout  # pytest's "interrupted"
    assert xml.exists(), "pytest wrote no JUnit file when interrupted"
    r = subprocess.run([sys.executable, str(CHECK_JUNIT), str(xml)], capture_output=True, text=True)
    assert r.returncode == 1, r.stdout
    assert "1 passed" in r.stdout and "interrupted inside a test" in r.stdout


def test_check_junit_fails_on_a_missing_or_broken_file(tmp_path):
    r = subprocess.run([sys.executable, str(CHECK_JUNIT), str(tmp_path / "none.xml")], capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stdout
    assert check_junit(tmp_path, "<testsuites><testsuite>").returncode == 2
    assert check_junit(tmp_path, "<html></html>").returncode == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the CUDA tests would run, not skip")
def test_check_junit_refuses_pytests_own_junit_of_the_cuda_tests_here(tmp_path):
    """End to end, on pytest's real JUnit output: here every CUDA test skips
    (no GPU), which is exactly what the GPU check must not take for a pass."""
    xml = tmp_path / "cuda.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
         str(ROOT / "tests" / "test_cuda.py")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    r = subprocess.run([sys.executable, str(CHECK_JUNIT), str(xml)], capture_output=True, text=True)
    assert r.returncode == 1, r.stdout
    assert "0 passed" in r.stdout
    assert re.search(r"skipped, not allowed: tests.test_cuda::test_odd_sizes_and_misaligned_pointers\[\S+\]: no CUDA GPU visible",
                     r.stdout)
    # The multi-GPU test's own reason is the allowed one; it cannot make up for the rest.
    assert "1 skipped (allowed: multi-GPU)" in r.stdout
    assert "skipped, allowed: tests.test_cuda::test_second_gpu_while_the_first_is_current: needs two GPUs" in r.stdout
    assert "skipped, not allowed: ... and " in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the CUDA tests would run, not skip")
def test_check_junit_refuses_the_pytest_steps_selection_here(tmp_path):
    """The pytest step's own selection (every test marked cuda, all of tests/), run here without a
    GPU: everything skips, and check_junit.py refuses it."""
    xml = tmp_path / "cuda.xml"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-p", "no:cacheprovider",
         "--continue-on-collection-errors", f"--junitxml={xml}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:]  # all skipped, none failed
    r = subprocess.run([sys.executable, str(CHECK_JUNIT), str(xml)], capture_output=True, text=True)
    assert r.returncode == 1 and "0 passed" in r.stdout, r.stdout
    # Beyond test_cuda.py: the tests of other files that run on the GPU, each a refused skip.
    cases = {(c.get("classname"), c.get("name")): c for c in ET.parse(xml).iter("testcase")}
    for key in (("tests.test_train", "test_cuda_amp_training[bf16]"),
                ("tests.test_export", "test_compiled_training_step_matches_eager_cuda_inductor"),
                ("tests.test_weight_quantization", "test_cuda_matches_cpu[binary_mean_scaling_quantize]")):
        assert key in cases and cases[key].find("skipped") is not None, (key, sorted(cases)[:5])
    assert "skipped, not allowed: ... and " in r.stdout


# --------------------------------------------------------------------------
# Without Triton: the CUDA compile test skips with its reason; inductor's CPU
# path (the CPU compile tests) needs no Triton.

_WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # importing triton now fails, as where it is not installed
sys.path.insert(0, sys.argv[1])
import torch
import conftest
import test_linear_mid_tread_half_quantize as family
assert conftest.HAS_TRITON is False
marks = [m for m in family.test_compile_fullgraph_on_cuda.pytestmark if m.name == "skipif"]
assert any(m.args[0] is True and "needs Triton" in m.kwargs["reason"] for m in marks), marks
import torch_ext
fn = torch.compile(lambda x: torch_ext.linear_mid_tread_half_quantize(x * 1.0, 3, 1.5) * 2.0, fullgraph=True)
x = torch.linspace(-1.0, 3.0, 101, requires_grad=True)
fn(x).sum().backward()
expected = torch_ext.linear_mid_tread_half_quantize(x.detach(), 3, 1.5) * 2.0
assert torch.equal(fn(x.detach()), expected)
print("ok")
"""


def test_without_triton_the_cuda_compile_test_skips_and_cpu_inductor_still_compiles():
    r = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRITON, str(ROOT / "tests")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])),
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
