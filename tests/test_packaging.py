"""pip install as users do it: an sdist that builds, a wheel that works outside the source tree.

From a copy of the tracked files: build the sdist, build the wheel *from the
sdist* (so the sdist must hold every source and header), install the wheel
into a fresh virtual environment that shares this environment's torch, and
from a folder outside the repository import torch_ext, run the operator
forward and backward, ``--help`` of every command and one short training
epoch; and that the benchmarks (``benchmarks/`` at the repository root) stay
out of the wheel (``test_benchmarks_stay_out_of_the_package`` checks that
cheaply, from setup.py, without building). The wheel is built with
``FORCE_CUDA=0`` to keep this test to about two minutes; the CUDA build and
the toolkit search are tested in ``test_cuda_toolkit_*`` below and by ``make
test``'s own build.
"""

import ast
import email.parser
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import cuda_toolkit  # noqa: E402  (scripts/cuda_toolkit.py, what setup.py loads)

COMMANDS = ("torch_ext.train", "torch_ext.deploy")
#: The installed console scripts.
SCRIPTS = ("torch-ext-train",)


def _tracked(prefixes=("",)):
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if p.startswith(prefixes) and (REPO / p).is_file()]


def _run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (the tracked files are what gets packaged)")
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    for rel in _tracked():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    dist = root / "dist"
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=src, env=dict(os.environ, FORCE_CUDA="0"))
    (sdist,) = dist.glob("*.tar.gz")
    unpacked = root / "unpacked"
    with tarfile.open(sdist) as tar:
        tar.extractall(unpacked, filter="data")
    (sdist_root,) = unpacked.iterdir()
    env = dict(os.environ, FORCE_CUDA="0", MAX_JOBS="2")
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", str(sdist_root),
          "-w", str(dist)], cwd=root, env=env, timeout=1200)
    (wheel,) = dist.glob("*.whl")
    return {"root": root, "sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="module")
def venv(packages):
    """A fresh virtual environment with the wheel installed and this environment's torch visible."""
    root = packages["root"]
    env_dir = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=root)
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root).stdout.strip())
    # torch and the extras' packages come from this environment; torch_ext only from the wheel
    # (a path added by a .pth file has its own .pth files, e.g. an editable install's, ignored).
    import torch

    (site / "shared_torch.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
          str(packages["wheel"])], cwd=root)
    outside = root / "elsewhere"
    outside.mkdir()
    return {"python": str(python), "bin": env_dir / "bin", "cwd": outside}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sdist_holds_every_file_needed_to_build(packages):
    with tarfile.open(packages["sdist"]) as tar:
        names = {"/".join(n.split("/")[1:]) for n in tar.getnames()}
    needed = _tracked(("csrc/", "cuda/", "torch_ext/", "requirements/")) + [
        "setup.py", "scripts/cuda_toolkit.py", "scripts/cxx_toolchain.py", "MANIFEST.in", "README.md"]
    missing = sorted(set(needed) - names)
    assert not missing, f"the sdist lacks {missing}"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_wheel_holds_every_module_and_declares_its_extras(packages):
    with zipfile.ZipFile(packages["wheel"]) as whl:
        names = set(whl.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(whl.read(metadata_name).decode())
        entry_points = {n: whl.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")}
    modules = [p for p in _tracked(("torch_ext/",)) if p.endswith(".py")]
    missing = sorted(set(modules) - names)
    assert not missing, f"the wheel lacks {missing}"
    assert any(n.startswith("torch_ext/_C") and n.endswith(".so") for n in names)
    # The benchmarks are run from the repository root, never installed.
    benches = sorted(n for n in names if n.startswith("benchmarks/") or "bench" in n.rsplit("/", 1)[-1])
    assert not benches, f"the wheel holds benchmark files {benches}"
    for name, text in entry_points.items():
        assert "bench" not in text, f"{name} declares a benchmark command:\n{text}"
    import torch

    minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    requires = metadata.get_all("Requires-Dist")
    assert f"torch=={minor}.*" in requires
    assert {"train", "onnx", "test"} <= set(metadata.get_all("Provides-Extra"))
    assert any(r.startswith("scikit-learn") and 'extra == "train"' in r for r in requires), requires
    assert any(r.startswith("onnxruntime") and 'extra == "onnx"' in r for r in requires), requires


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_installed_wheel_works_outside_the_source_tree(venv):
    py, cwd = venv["python"], venv["cwd"]
    check = (
        "import torch, torch_ext, sys\n"
        "assert 'site-packages' in torch_ext.__file__, torch_ext.__file__\n"
        "x = torch.tensor([-1.0, 0.4, 1.0, 2.5], dtype=torch.float64, requires_grad=True)\n"
        "y = torch_ext.linear_mid_tread_half_quantize(x, 2, 2.0)\n"
        "y.sum().backward()\n"
        "assert y.tolist() == [0.0, 2 / 3, 4 / 3, 2.0], y.tolist()\n"
        "assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0], x.grad.tolist()\n"
        "print(torch_ext.__file__)\n"
    )
    _run([py, "-c", check], cwd=cwd)
    for command in COMMANDS:
        assert "usage:" in _run([py, "-m", command, "--help"], cwd=cwd).stdout
    for script in SCRIPTS:
        assert "usage:" in _run([str(venv["bin"] / script), "--help"], cwd=cwd).stdout
    assert not sorted(p.name for p in venv["bin"].glob("*bench*")), "a benchmark command was installed"
    proc = subprocess.run([py, "-c", "import benchmarks"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "No module named 'benchmarks'" in proc.stderr, proc.stderr
    out = cwd / "run"
    _run([py, "-m", "torch_ext.train", "--epochs", "1", "--image-size", "8", "--batch-size", "64", "--threads", "1",
          "--no-progress", "--device", "cpu", "--out", str(out)], cwd=cwd)
    assert (out / "checkpoint.pt").is_file() and (out / "training.png").is_file()


def _setup_call(setup_py: Path) -> ast.Call:
    """The ``setup(...)`` call of ``setup_py``, parsed, not run."""
    calls = [n for n in ast.walk(ast.parse(setup_py.read_text(), str(setup_py)))
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    assert len(calls) == 1, f"{setup_py}: expected one setup(...) call, found {len(calls)}"
    return calls[0]


def _keyword(call: ast.Call, name: str) -> ast.expr:
    (value,) = [k.value for k in call.keywords if k.arg == name]
    return value


def packaging_problems(setup_py: Path) -> list:
    """What would put a benchmark into the wheel, or leave a command pointing at one; [] when nothing.

    Read from ``setup_py`` without running it: the packages its
    ``find_packages(...)`` call finds (from the repository, not the copy a
    wheel is built from), the modules of ``torch_ext`` and its console scripts.
    """
    import setuptools

    from_setup = _keyword(_setup_call(setup_py), "packages")
    assert isinstance(from_setup, ast.Call) and getattr(from_setup.func, "id", None) == "find_packages", (
        f"{setup_py}: packages= is no find_packages(...) call")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in from_setup.keywords}
    packages = setuptools.find_packages(where=str(REPO), **kwargs)
    problems = [f"find_packages(**{kwargs}) takes {p}" for p in packages if not p.startswith("torch_ext")]
    if "torch_ext" not in packages:
        problems.append(f"find_packages(**{kwargs}) leaves out torch_ext: {packages}")
    for path in sorted((REPO / "torch_ext").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if "bench" in path.name:
            problems.append(f"{rel}: a benchmark inside the package (they belong in benchmarks/)")
        imports = [n for n in ast.walk(ast.parse(path.read_text(), rel)) if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in imports:
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m == "benchmarks" or m.startswith("benchmarks.") for m in modules):
                problems.append(f"{rel}:{node.lineno}: imports benchmarks (benchmarks import torch_ext, not the "
                                "reverse)")
    scripts = ast.literal_eval(_keyword(_setup_call(setup_py), "entry_points")).get("console_scripts", [])
    for entry in scripts:
        name, _, target = (part.strip() for part in entry.partition("="))
        module, _, function = target.partition(":")
        if "bench" in name or not module.startswith("torch_ext") or importlib.util.find_spec(module) is None:
            problems.append(f"console script {entry!r}: not a command of the torch_ext package")
        elif not callable(getattr(importlib.import_module(module), function, None)):
            problems.append(f"console script {entry!r}: {module} has no function {function!r}")
    return problems


def test_benchmarks_stay_out_of_the_package():
    """The cheap half of the wheel tests: benchmarks/ is no package of setup.py, torch_ext holds none."""
    assert packaging_problems(REPO / "setup.py") == []


def test_missing_extra_is_one_clear_line(tmp_path):
    # numpy (the 'train' extra) made unimportable: the command says what to install.
    code = "import sys; sys.modules['numpy'] = None; from torch_ext import train; sys.exit(train.cli(['--epochs', '1']))"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    # (torch itself may warn that it found no NumPy: that is torch's line, not ours.)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "pip install 'torch_ext[train]'" in errors[0] and "numpy" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_build_without_torch_says_what_to_do(tmp_path):
    # pip's isolated build environment has no torch: setup.py says to build without isolation.
    fake = tmp_path / "no_torch"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('No module named torch')\n")
    env = dict(os.environ, PYTHONPATH=str(fake))
    proc = subprocess.run([sys.executable, str(REPO / "setup.py"), "--name"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "install torch first" in proc.stderr and "--no-build-isolation" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def _fake_toolkit(root: Path, runtime: bool) -> Path:
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools'\n")
    nvcc.chmod(0o755)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    if runtime:
        (root / "lib64").mkdir()
        (root / "lib64" / "libcudart.so").write_text("")
    return root


def test_cuda_toolkit_follows_a_wrapper_nvcc(tmp_path):
    # /usr/local/bin/nvcc as a wrapper script: torch would guess /usr/local (no CUDA runtime).
    real = _fake_toolkit(tmp_path / "cuda-13.0", runtime=True)
    wrapper_bin = tmp_path / "local" / "bin"
    wrapper_bin.mkdir(parents=True)
    (wrapper_bin / "nvcc").write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    (wrapper_bin / "nvcc").chmod(0o755)
    env = {"PATH": f"{wrapper_bin}{os.pathsep}/usr/bin{os.pathsep}/bin",
           "TORCH_EXT_DEFAULT_CUDA": str(tmp_path / "no-such-cuda")}
    folder, how = cuda_toolkit.find_cuda_home(env)
    assert folder == str(real) and how == f"exec'd by the wrapper {wrapper_bin}/nvcc"


def test_cuda_toolkit_refuses_a_bad_cuda_home(tmp_path):
    no_runtime = _fake_toolkit(tmp_path / "half", runtime=False)
    with pytest.raises(cuda_toolkit.ToolkitError, match=r"CUDA_HOME=.*half is not a usable CUDA toolkit \(no "
                                                        r"libcudart.so\* in lib64/, lib/ or targets/\*/lib/\); set "
                                                        r"CUDA_HOME"):
        cuda_toolkit.find_cuda_home({"CUDA_HOME": str(no_runtime)})
    good = _fake_toolkit(tmp_path / "good", runtime=True)
    assert cuda_toolkit.find_cuda_home({"CUDA_HOME": str(good)}) == (str(good), "$CUDA_HOME")


@pytest.mark.skipif(not Path("/usr/local/cuda/bin/nvcc").exists(), reason="needs this machine's CUDA toolkit")
def test_cuda_toolkit_found_on_this_machine():
    folder, _ = cuda_toolkit.find_cuda_home({})
    assert cuda_toolkit.problem(folder) is None
    assert Path(folder, "lib64", "libcudart.so").exists() or Path(folder, "lib", "libcudart.so").exists()
