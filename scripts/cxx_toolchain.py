"""The C++ compiler to build torch_ext with: one that links libstdc++ shared. The one home of this rule.

A g++ with no shared libstdc++ (only ``libstdc++.a``; ``g++
-print-file-name=libstdc++.so`` then answers the bare name ``libstdc++.so``,
no existing file) links a static copy of libstdc++ into ``_C.so``: its
iostreams and locale then sit beside the shared ones torch loads, and the
extension crashes (SIGSEGV) on its first error message that formats a number.
Seen with a GCC 13.3 under ``/opt/gcc`` set as ``CXX``; a conda or custom
toolchain can do the same. Built with the system's ``/usr/bin/g++`` the same
code passes.

The compiler in use is the one torch.utils.cpp_extension compiles and links
with: ``$CXX``, else ``c++``. ``CXX`` may hold a command with arguments
(``ccache g++``).

``setup.py`` refuses to build with a static-only compiler (unless
``TORCH_EXT_ALLOW_STATIC_LIBSTDCXX=1``); ``scripts/gpu_check.sh`` picks a good
one in its preflight. As a script::

    python scripts/cxx_toolchain.py --check [CXX]   one line; exit 0 shared, 1 static-only, 2 cannot be run
    python scripts/cxx_toolchain.py --find          the first good compiler ($CXX, /usr/bin/g++,
                                                    /usr/bin/c++, g++ and c++ on PATH); exit 1 and
                                                    one line (stderr) why when there is none
    python scripts/cxx_toolchain.py --select        the GPU check's choice: CXX=, CC= (where it
                                                    switches), why: and compiler: lines; exit 1
                                                    and one line (stderr) when no compiler is good
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

__all__ = [
    "CompilerError",
    "compiler_in_use",
    "default_candidates",
    "describe",
    "find_shared_cxx",
    "libstdcxx_of",
    "links_shared_libstdcxx",
    "matching_cc",
    "resolved",
    "static_only_message",
]

#: What ``-print-file-name`` is asked for.
LIBRARY = "libstdc++.so"
#: The system's compilers, tried after ``$CXX`` (``$TORCH_EXT_SYSTEM_CXX`` replaces them: the tests).
SYSTEM_CXX = ("/usr/bin/g++", "/usr/bin/c++")


class CompilerError(RuntimeError):
    """The compiler cannot be run (not found, not executable, or it fails to answer)."""


def _words(cxx: str) -> List[str]:
    words = shlex.split(cxx)
    if not words:
        raise CompilerError("an empty compiler command")
    return words


def resolved(cxx: str) -> str:
    """``cxx`` with its program resolved on PATH (``g++`` -> ``/usr/bin/g++``); as given when not found
    or when it is a command with arguments."""
    words = shlex.split(cxx) if cxx.strip() else []
    if len(words) == 1:
        return shutil.which(words[0]) or words[0]
    return cxx


def _run(cxx: str, *args: str) -> str:
    words = _words(cxx)
    try:
        out = subprocess.run([*words, *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CompilerError(f"{cxx} cannot be run ({exc})") from exc
    if out.returncode != 0:
        last = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise CompilerError(f"{cxx} cannot be run ({' '.join(args)} exits {out.returncode}: {last[0][:200]})")
    return out.stdout


def libstdcxx_of(cxx: str) -> Optional[str]:
    """The shared libstdc++ ``cxx`` links (``cxx -print-file-name=libstdc++.so``), or None when it names no
    existing file (it answers the bare name: only ``libstdc++.a``, or none). Raises :class:`CompilerError`
    when ``cxx`` cannot be run."""
    answer = _run(cxx, f"-print-file-name={LIBRARY}").strip()
    return answer if os.path.isabs(answer) and os.path.isfile(answer) else None


def links_shared_libstdcxx(cxx: str) -> bool:
    """Whether ``cxx`` links libstdc++ shared; raises :class:`CompilerError` when it cannot be run."""
    return libstdcxx_of(cxx) is not None


def compiler_in_use(env: Optional[dict] = None) -> str:
    """The compiler torch.utils.cpp_extension would compile and link with: ``$CXX``, else ``c++``."""
    env = os.environ if env is None else env
    return env.get("CXX") or "c++"


def default_candidates(env: Optional[dict] = None) -> List[str]:
    """``$CXX``, the system's (``$TORCH_EXT_SYSTEM_CXX``, a ``:``-separated list, else /usr/bin/g++ and
    /usr/bin/c++), g++ and c++ on PATH; each once."""
    env = os.environ if env is None else env
    system = env.get("TORCH_EXT_SYSTEM_CXX")
    out = [env["CXX"]] if env.get("CXX") else []
    out += [cxx for cxx in (system.split(":") if system else SYSTEM_CXX) if cxx]
    out += [found for found in (shutil.which(name, path=env.get("PATH")) for name in ("g++", "c++")) if found]
    unique: Dict[str, str] = {}
    for cxx in out:
        unique.setdefault(resolved(cxx), cxx)
    return list(unique.values())


def find_shared_cxx(candidates: Optional[Sequence[str]] = None, tried: Optional[List[str]] = None) -> Optional[str]:
    """The first of ``candidates`` (default: :func:`default_candidates`) that links libstdc++ shared,
    resolved on PATH; None when none does. ``tried``, where given, receives a line for each compiler
    passed over."""
    if candidates is None:
        candidates = default_candidates()
    for cxx in candidates:
        if not cxx.strip() or shutil.which(shlex.split(cxx)[0]) is None:
            if tried is not None:
                tried.append(f"{cxx}: not found")
            continue
        try:
            if links_shared_libstdcxx(cxx):
                return resolved(cxx)
            why = f"no shared libstdc++ ({cxx} -print-file-name={LIBRARY} finds none)"
        except CompilerError as exc:
            why = str(exc)
        if tried is not None:
            tried.append(f"{cxx}: {why}")
    return None


def matching_cc(cxx: str) -> Optional[str]:
    """The C compiler beside ``cxx`` (``/usr/bin/gcc`` for ``/usr/bin/g++``, ``cc`` for ``c++``,
    ``clang`` for ``clang++``), where it exists."""
    path = resolved(cxx)
    folder, name = os.path.split(path)
    if not folder:
        return None
    for suffix, c in (("clang++", "clang"), ("g++", "gcc"), ("c++", "cc")):
        if suffix in name:
            cc = os.path.join(folder, name.replace(suffix, c, 1))
            return cc if os.path.isfile(cc) and os.access(cc, os.X_OK) else None
    return None


def describe(cxx: str) -> str:
    """``GCC 13.3.0``, ``clang 18.1.3``, or the first line of ``cxx --version``."""
    try:
        text = _run(cxx, "--version")
    except CompilerError:
        return "version unknown"
    first = (text.splitlines() or [""])[0].strip()
    clang = re.search(r"clang version (\S+)", first)
    if clang:
        return f"clang {clang.group(1)}"
    if "Free Software Foundation" in text:
        try:
            return f"GCC {_run(cxx, '-dumpfullversion', '-dumpversion').strip()}"
        except CompilerError:
            pass
    return first or "version unknown"


def static_only_message(cxx: str, found: Optional[str]) -> str:
    """setup.py's one line for a static-only compiler ``cxx``; ``found``: a good compiler, or None."""
    path = resolved(cxx)
    return (f"torch_ext: the C++ compiler {path} has no shared libstdc++ ({path} -print-file-name={LIBRARY} "
            "finds none): an extension built with it crashes on its first error message; build with "
            f"CXX=/usr/bin/g++ (found: {found or 'none found'})")


def _select() -> int:
    """The GPU check's choice of compiler (scripts/gpu_check.sh --find-cxx): ``CXX=``, ``CC=`` (only when
    it switches and a matching C compiler is there), ``why: kept ...`` or ``why: switched ...``, and
    ``compiler:`` (path, version, the libstdc++ it links)."""
    cxx = compiler_in_use()
    how = "$CXX" if os.environ.get("CXX") else "the default, CXX unset"
    try:
        lib = libstdcxx_of(cxx)
        problem = None if lib else (
            f"it has no shared libstdc++ ({resolved(cxx)} -print-file-name={LIBRARY} finds none): "
            "an extension built with it crashes on its first error message")
    except CompilerError as exc:
        lib, problem = None, str(exc)
    if problem is None:
        chosen, cc, why = cxx, None, f"kept {resolved(cxx)} ({how}): it links libstdc++ shared"
    else:
        tried: List[str] = []
        chosen = find_shared_cxx(tried=tried)
        if chosen is None:
            print(f"no C++ compiler links libstdc++ shared: {resolved(cxx)} ({how}): {problem}; "
                  f"tried: {'; '.join(tried)}", file=sys.stderr)
            return 1
        cc, lib = matching_cc(chosen), libstdcxx_of(chosen)
        why = f"switched from {resolved(cxx)} ({how}): {problem}"
    print(f"CXX={resolved(chosen)}")
    if cc:
        print(f"CC={cc}")
    print(f"why: {why}")
    print(f"compiler: {resolved(chosen)} ({describe(chosen)}), libstdc++ shared ({lib})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--check"] and len(args) <= 2:
        cxx = args[1] if len(args) == 2 else compiler_in_use()
        try:
            lib = libstdcxx_of(cxx)
        except CompilerError as exc:
            print(f"torch_ext: the C++ compiler {exc}")
            return 2
        if lib is None:
            print(static_only_message(cxx, find_shared_cxx()))
            return 1
        print(f"torch_ext: the C++ compiler {resolved(cxx)} ({describe(cxx)}) links libstdc++ shared ({lib})")
        return 0
    if args == ["--find"]:
        tried: List[str] = []
        found = find_shared_cxx(tried=tried)
        if found is None:
            print(f"no C++ compiler links libstdc++ shared; tried: {'; '.join(tried) or 'nothing'}", file=sys.stderr)
            return 1
        print(found)
        return 0
    if args == ["--select"]:
        return _select()
    print(__doc__.split("As a script::")[1].rstrip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
