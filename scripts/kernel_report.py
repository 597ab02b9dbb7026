"""Report on the SASS of torch_ext's CUDA kernels, read from the built extension: no GPU needed.

The quantizer kernels are memory-bound only while they spend few instructions
an element, never call the division slow path, and move their data with
128-bit loads and stores. All of that is visible in the machine code nvcc
wrote into ``torch_ext/_C*.so``, so this script reads it there with
``cuobjdump`` (``-sass`` for the instructions, ``-elf`` for the names of the
subroutines the kernels call, ``-res-usage`` for the registers) and prints,
for each kernel of one architecture (``sm_90``, the H200, by default):

- ``instr``: SASS instructions, subroutines included (the division slow path
  is code placed after the kernel's EXIT), the trailing NOP padding and the
  ``BRA``-to-self trap excluded;
- ``regs``: registers a thread;
- ``div``: calls of a division (or reciprocal) subroutine, e.g.
  ``$__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath`` (what ``a / b``
  in float32 falls back to) or ``$__internal_1_$__cuda_sm20_div_rn_f64_full``;
- ``rcp``: ``MUFU.RCP`` and ``MUFU.RCP64H``, the fast path of those divisions;
- ``ldg``/``stg``: global loads and stores by width in bits (128/64/32/16/8);
- ``st.u8``: byte stores (``STG.E.U8``);
- ``loop``: the hot loop, the innermost loop (a backward branch and the code
  between its target and it) that holds a 128-bit global load; its static
  instruction count, so code the loop body skips (a scalar tail path) counts;
- ``el/it`` and ``ins/el``: elements a thread moves an iteration of that loop
  (``--bytes-per-iteration`` over the dtype's size, the dtype read from the
  kernel's first template argument) and hot-loop instructions an element.

    python scripts/kernel_report.py [SO | --so SO] [--arch sm_90] [--filter REGEX]
                                    [--json PATH|-] [--bytes-per-iteration N] [--cuobjdump PATH]

The tools come from the PyPI wheels ``nvidia-cuda-cuobjdump`` and
``nvidia-cuda-nvdisasm`` (``cuobjdump -sass`` runs ``nvdisasm``); they are
looked for on ``PATH``, in the ``nvidia/*/bin`` folders of this Python's and
the repository's ``.venv``'s site-packages, then in ``$CUDA_HOME/bin`` and
``/usr/local/cuda/bin``. Exit status: 0 on a report, 1 when no kernel matches
the filter, 2 when cuobjdump or nvdisasm is missing, 3 when there is no
extension or it holds no code for the architecture (built without CUDA, or
without it in TORCH_CUDA_ARCH_LIST).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

# The kernels' names (scripts/kernel_names.py, beside this file).
from kernel_names import DTYPE_BYTES, demangle, dtype_of, function_of, short_name, template_args  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Bytes a thread moves an iteration of the vectorized main loop: the new
#: kernels load 4 vectors of 16 bytes (LDG.E.128) a thread an iteration, so
#: that enough loads are in flight to cover the memory latency. Elements an
#: iteration are this over the dtype's size (``--bytes-per-iteration``).
BYTES_PER_ITERATION = 64

#: The subroutines that count as divisions: nvcc's slow paths of ``div.rn``
#: (``__cuda_sm3x_div_rn_noftz_f32_slowpath``, ``__cuda_sm20_div_rn_f64_full``)
#: and of ``rcp.rn`` (``1.0 / x`` in float64: ``__cuda_sm20_dblrcp_rn_slowpath_v3``).
DIVISION_SUBROUTINE = re.compile(r"div|rcp", re.IGNORECASE)

#: Width in bits of a global load or store, by the modifier that says it; none of them: 32.
WIDTH_MODIFIERS = {"256": 256, "128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}
WIDTHS = (128, 64, 32, 16, 8)

INSTALL = f"{sys.executable} -m pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm"

# "        /*0280*/                   CALL.REL.NOINC 0x630 ;          /* 0x0000000000e87944 */"
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:(@!?U?P(?:T|\d+))\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")


@dataclass
class Instruction:
    address: int
    opcode: str  # with its modifiers: "LDG.E.128.CONSTANT"
    operands: str = ""
    predicate: str = ""
    callee: Optional[str] = None  # the function a CALL goes to, once resolve_calls() named it

    @property
    def op(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def modifiers(self) -> List[str]:
        return self.opcode.split(".")[1:]

    @property
    def width(self) -> int:
        """Bits moved by a load or store (32 when no modifier says otherwise)."""
        return next((WIDTH_MODIFIERS[m] for m in self.modifiers if m in WIDTH_MODIFIERS), 32)

    @property
    def target(self) -> Optional[int]:
        """The address a BRA or CALL goes to, when it is written as one."""
        match = re.search(r"\b0x([0-9a-fA-F]+)\s*$", self.operands)
        return int(match.group(1), 16) if match else None


@dataclass
class Symbol:
    """A subroutine of a kernel: its code is at [start, start + size) of the kernel's listing."""

    name: str
    start: int
    size: int


@dataclass
class Loop:
    start: int  # the backward branch's target
    end: int  # the backward branch (the last one to that target)
    instructions: int
    wide_loads: int  # LDG of 128 bits or more
    division_calls: int = 0  # CALLs of a division subroutine inside the loop
    mufu_rcp: int = 0  # MUFU.RCP / RCP64H inside the loop

    def figures(self) -> dict:
        # Addresses in hex, as cuobjdump prints them.
        return dict(vars(self), start=hex(self.start), end=hex(self.end))


@dataclass
class Kernel:
    """All figures of one kernel; ``figures()`` is what ``--json`` writes."""

    mangled: str
    demangled: str
    function: str  # demangled, without the return type and the parameters
    name: str  # short: namespaces shortened, template arguments kept
    dtype: Optional[str]
    instructions: int
    registers: Optional[int]
    calls: int
    unnamed_calls: int  # CALLs whose target no symbol names (then never counted as divisions)
    division_calls: int
    mufu_rcp: int
    mufu_rcp64h: int
    ldg: Dict[int, int]
    stg: Dict[int, int]
    byte_stores: int
    subroutines: List[dict] = field(default_factory=list)
    loops: List[Loop] = field(default_factory=list)
    hot_loop: Optional[Loop] = None
    elements_per_iteration: Optional[float] = None

    @property
    def instructions_per_element(self) -> Optional[float]:
        if self.hot_loop is None or not self.elements_per_iteration:
            return None
        return self.hot_loop.instructions / self.elements_per_iteration

    def figures(self) -> dict:
        out = {
            "name": self.name,
            "function": self.function,
            "demangled": self.demangled,
            "mangled": self.mangled,
            "dtype": self.dtype,
            "instructions": self.instructions,
            "registers": self.registers,
            "calls": self.calls,
            "unnamed_calls": self.unnamed_calls,
            "division_calls": self.division_calls,
            "mufu_rcp": self.mufu_rcp + self.mufu_rcp64h,
            "mufu_rcp32": self.mufu_rcp,
            "mufu_rcp64h": self.mufu_rcp64h,
        }
        out.update({f"ldg_{w}": self.ldg.get(w, 0) for w in WIDTHS})
        out.update({f"stg_{w}": self.stg.get(w, 0) for w in WIDTHS})
        if self.ldg.get(256) or self.stg.get(256):
            out.update(ldg_256=self.ldg.get(256, 0), stg_256=self.stg.get(256, 0))
        out["byte_stores"] = self.byte_stores
        out["hot_loop_instructions"] = self.hot_loop.instructions if self.hot_loop else None
        # Divisions in the main loop (a kernel may divide once, outside it: the
        # learnable forward's threshold search).
        out["hot_loop_division_calls"] = self.hot_loop.division_calls if self.hot_loop else None
        out["hot_loop_mufu_rcp"] = self.hot_loop.mufu_rcp if self.hot_loop else None
        out["elements_per_iteration"] = self.elements_per_iteration if self.hot_loop else None
        out["instructions_per_element"] = self.instructions_per_element
        out["hot_loop"] = self.hot_loop.figures() if self.hot_loop else None
        out["loops"] = [loop.figures() for loop in self.loops]
        out["subroutines"] = [dict(s, start=hex(s["start"])) for s in self.subroutines]
        return out


# --------------------------------------------------------------------------
# Parsing cuobjdump's output.


def parse_sass(text: str) -> Dict[str, List[Instruction]]:
    """``{mangled name: instructions}`` of ``cuobjdump -sass``, in the order listed."""
    functions: Dict[str, List[Instruction]] = {}
    current: Optional[List[Instruction]] = None
    for line in text.splitlines():
        header = _FUNCTION.match(line)
        if header:
            current = functions.setdefault(header.group(1), [])
            continue
        if line.lstrip().startswith("Fatbin"):
            current = None  # the next cubin (or a PTX listing): a Function line comes first
            continue
        match = _INSTRUCTION.match(line) if current is not None else None
        if match:
            address, predicate, opcode, operands = match.groups()
            current.append(Instruction(int(address, 16), opcode, operands.strip(), predicate or ""))
    return functions


@dataclass
class Elf:
    """What ``cuobjdump -elf`` says of the functions' sections, keyed by function name.

    cuobjdump -sass prints no label: a CALL says ``CALL.REL.NOINC 0x630`` or,
    to a function of another section, ``CALL.ABS.NOINC 0x0``. A subroutine
    nvcc placed in the caller's own ``.text.<kernel>`` section (the division
    slow path) is named by the symbol table (value: its offset there; shndx:
    that section); a function of its own section (relocatable device code) by
    the caller's relocation at the CALL (``.rela.text.<caller>``). Names are
    unique across the cubins of one library: the anonymous namespace's hash
    says which file a kernel is from.
    """

    subroutines: Dict[str, List[Symbol]] = field(default_factory=dict)
    relocations: Dict[str, Dict[int, str]] = field(default_factory=dict)  # {offset: symbol}


def parse_elf(text: str) -> Elf:
    """The subroutine symbols and the relocations of every ``.text.<function>`` of ``cuobjdump -elf``."""
    elf = Elf()
    sections: Dict[int, str] = {}
    mode, relocated = None, ""
    for line in text.splitlines():
        stripped = line.strip()
        cells = stripped.split()
        if re.match(r"(32|64)-bit ELF", stripped):
            sections, mode = {}, None
        elif stripped == "Sections:":
            mode = "sections"
        elif stripped == ".section .symtab":
            mode = "symtab"
        elif stripped.startswith(".section .rela.text.") or stripped.startswith(".section .rel.text."):
            mode, relocated = "relocations", cells[1].split(".text.", 1)[1]
        elif not stripped or stripped.startswith(".section"):
            mode = None
        elif mode == "sections" and len(cells) == 10 and re.fullmatch(r"[0-9a-f]+", cells[0]):
            sections[int(cells[0], 16)] = cells[9]
        elif mode == "symtab" and len(cells) == 7 and all(re.fullmatch(r"(0x)?[0-9a-f]+", c) for c in cells[:6]):
            value, size, info, shndx = (int(cells[i], 16) for i in (1, 2, 3, 5))
            section, name = sections.get(shndx, ""), cells[6]
            # A function (STT_FUNC) inside another function's section.
            if info & 0xF == 2 and section.startswith(".text.") and name != section[len(".text."):]:
                elf.subroutines.setdefault(section[len(".text."):], []).append(Symbol(name, value, size))
        elif mode == "relocations" and len(cells) >= 3 and re.fullmatch(r"0x[0-9a-f]+", cells[0]):
            elf.relocations.setdefault(relocated, {})[int(cells[0], 16)] = cells[1]
    return elf


def resolve_calls(functions: Dict[str, List[Instruction]], elf: Elf) -> None:
    """Name the target of every CALL (``Instruction.callee``); None where nothing names it."""
    for name, code in functions.items():
        relocations = elf.relocations.get(name, {})
        subroutines = elf.subroutines.get(name, [])
        for ins in code:
            if ins.op != "CALL":
                continue
            if ins.address in relocations:
                ins.callee = relocations[ins.address]
            elif ins.target is not None:
                inside = [s for s in subroutines if s.start <= ins.target < s.start + max(s.size, 1)]
                ins.callee = min(inside, key=lambda s: s.size).name if inside else None


def parse_registers(text: str) -> Dict[str, int]:
    """``{mangled name: registers}`` from ``cuobjdump -res-usage``."""
    out: Dict[str, int] = {}
    name = None
    for line in text.splitlines():
        header = re.match(r"^\s*Function\s+(\S+?):\s*$", line)
        if header:
            name = header.group(1)
            continue
        regs = re.search(r"\bREG:(\d+)", line)
        if regs and name is not None:
            out[name] = int(regs.group(1))
            name = None
    return out


# --------------------------------------------------------------------------
# Figures of one kernel.


def strip_padding(code: List[Instruction]) -> List[Instruction]:
    """The code without the NOPs after its end and the ``BRA`` to itself before them (a trap never run)."""
    end = len(code)
    while end and code[end - 1].op == "NOP":
        end -= 1
    last = code[end - 1] if end else None
    if last is not None and last.op == "BRA" and not last.predicate and last.target == last.address:
        end -= 1
    return code[:end]


def find_loops(code: List[Instruction]) -> List[Loop]:
    """Every loop: a backward branch and the code between its target and it (one loop a target)."""
    ends: Dict[int, int] = {}
    for ins in code:
        target = ins.target if ins.op == "BRA" else None
        if target is not None and target < ins.address:
            ends[target] = max(ends.get(target, 0), ins.address)
    loops = []
    for start, end in sorted(ends.items()):
        body = [ins for ins in code if start <= ins.address <= end]
        wide = sum(1 for ins in body if ins.op == "LDG" and ins.width >= 128)
        divisions = sum(1 for ins in body if ins.op == "CALL" and ins.callee and DIVISION_SUBROUTINE.search(ins.callee))
        rcp = sum(1 for ins in body if ins.op == "MUFU" and ins.modifiers[:1] in (["RCP"], ["RCP64H"]))
        loops.append(Loop(start, end, len(body), wide, divisions, rcp))
    return loops


def analyse(mangled: str, code: List[Instruction], demangled: Optional[str] = None,
            symbols: Sequence[Symbol] = (), registers: Optional[int] = None,
            bytes_per_iteration: float = BYTES_PER_ITERATION) -> Kernel:
    """The figures of one kernel from its SASS (CALLs resolved), its subroutines and its registers."""
    demangled = demangled or mangled
    code = strip_padding(code)
    function = function_of(demangled)

    calls = [ins.callee for ins in code if ins.op == "CALL"]
    subroutines = [
        {"name": s.name, "start": s.start, "division": bool(DIVISION_SUBROUTINE.search(s.name)),
         "instructions": sum(1 for i in code if s.start <= i.address < s.start + s.size)}
        for s in sorted(symbols, key=lambda s: s.start)
    ]
    ldg: Dict[int, int] = {}
    stg: Dict[int, int] = {}
    for ins in code:
        if ins.op in ("LDG", "STG"):
            counts = ldg if ins.op == "LDG" else stg
            counts[ins.width] = counts.get(ins.width, 0) + 1
    loops = find_loops(code)
    # The innermost loop that loads 128 bits at a time: the vectorized main loop.
    hot = min((loop for loop in loops if loop.wide_loads), key=lambda loop: (loop.instructions, loop.start),
              default=None)
    dtype = dtype_of(mangled, function)
    return Kernel(
        mangled=mangled,
        demangled=demangled,
        function=function,
        name=short_name(function) if function != mangled else mangled,
        dtype=dtype,
        instructions=len(code),
        registers=registers,
        calls=len(calls),
        unnamed_calls=sum(1 for callee in calls if callee is None),
        division_calls=sum(1 for callee in calls if callee and DIVISION_SUBROUTINE.search(callee)),
        mufu_rcp=sum(1 for i in code if i.op == "MUFU" and i.modifiers[:1] == ["RCP"]),
        mufu_rcp64h=sum(1 for i in code if i.op == "MUFU" and i.modifiers[:1] == ["RCP64H"]),
        ldg=ldg,
        stg=stg,
        byte_stores=sum(1 for i in code if i.op == "STG" and "U8" in i.modifiers),
        subroutines=subroutines,
        loops=loops,
        hot_loop=hot,
        elements_per_iteration=bytes_per_iteration / DTYPE_BYTES[dtype] if dtype else None,
    )


def merge_called_functions(functions: Dict[str, List[Instruction]],
                           subroutines: Dict[str, List[Symbol]]) -> Tuple[Dict[str, List[Instruction]],
                                                                          Dict[str, List[Symbol]]]:
    """The kernels (functions nothing calls), each with the functions it calls appended.

    nvcc places a kernel's subroutines in the kernel's own section (then they
    are already part of its listing), except functions of a section of their
    own (relocatable device code: ``-rdc``), which cuobjdump lists apart. The
    code of those a kernel calls, directly or not, is appended to its code
    once (addresses shifted past its end), and named among its subroutines.
    """
    called = {ins.callee for code in functions.values() for ins in code if ins.op == "CALL"}
    kernels: Dict[str, List[Instruction]] = {}
    symbols: Dict[str, List[Symbol]] = {}
    for kernel, code in functions.items():
        if kernel in called:
            continue
        code, own = strip_padding(code), list(subroutines.get(kernel, []))
        pending = [ins.callee for ins in code if ins.op == "CALL"]
        seen = {kernel}
        while pending:
            callee = pending.pop(0)
            if callee in seen or callee not in functions:
                continue
            seen.add(callee)
            base = code[-1].address + 16 if code else 0
            appended = [replace(ins, address=ins.address + base) for ins in strip_padding(functions[callee])]
            own.append(Symbol(callee, base, len(appended) * 16))
            own += [Symbol(s.name, s.start + base, s.size) for s in subroutines.get(callee, [])]
            pending += [ins.callee for ins in appended if ins.op == "CALL"]
            code = code + appended
        kernels[kernel], symbols[kernel] = code, own
    return kernels, symbols


def kernels_from_listings(sass: str, elf: str, res_usage: str, bytes_per_iteration: float = BYTES_PER_ITERATION,
                          demangler=None) -> List[Kernel]:
    """The figures of every kernel from the text of ``cuobjdump -sass``, ``-elf`` and ``-res-usage``."""
    functions = parse_sass(sass)
    sections = parse_elf(elf)
    resolve_calls(functions, sections)
    kernels, subroutines = merge_called_functions(functions, sections.subroutines)
    registers = parse_registers(res_usage)
    names = (demangler or demangle)(kernels)
    return [analyse(name, code, names.get(name), subroutines.get(name, ()), registers.get(name), bytes_per_iteration)
            for name, code in kernels.items()]


# --------------------------------------------------------------------------
# The tools.


def _tool_folders() -> List[str]:
    """Where the tools may be, after PATH: the nvidia wheels' bin folders, then CUDA toolkits."""
    sites = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    sites.update(glob.glob(os.path.join(ROOT, ".venv", "lib", "python3*", "site-packages")))
    folders = sorted({f for site in sites for f in glob.glob(os.path.join(site, "nvidia", "*", "bin"))})
    if os.environ.get("CUDA_HOME"):
        folders.append(os.path.join(os.environ["CUDA_HOME"], "bin"))
    return folders + ["/usr/local/cuda/bin"]


def find_tool(name: str) -> Optional[str]:
    """The path of ``cuobjdump`` or ``nvdisasm``: on PATH, in the nvidia wheels, in a CUDA toolkit."""
    found = shutil.which(name)
    if found:
        return found
    for folder in _tool_folders():
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


class ToolError(RuntimeError):
    """cuobjdump could not be run, or found no code: the message is the one line to print."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def run_cuobjdump(cuobjdump: str, what: str, so: str, arch: str) -> str:
    """``cuobjdump <what> -arch <arch> <so>``, with nvdisasm's folder on PATH (``-sass`` runs it)."""
    env = dict(os.environ)
    nvdisasm = shutil.which("nvdisasm", path=os.path.dirname(cuobjdump)) or find_tool("nvdisasm")
    folders = [os.path.dirname(p) for p in (nvdisasm, cuobjdump) if p]
    env["PATH"] = os.pathsep.join(folders + [env.get("PATH", "")])
    try:
        proc = subprocess.run([cuobjdump, what, "-arch", arch, so], capture_output=True, text=True, env=env,
                              timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ToolError(f"kernel_report: {cuobjdump} {what} failed: {exc}", 2) from exc
    message = " ".join((proc.stderr or proc.stdout).split())[:300]
    if "nvdisasm" in proc.stderr:
        raise ToolError(f"kernel_report: cuobjdump needs nvdisasm ({message}); install it: {INSTALL}", 2)
    if "does not contain device code" in proc.stderr:
        raise ToolError(f"kernel_report: {so} holds no CUDA code (built without CUDA?)", 3)
    if proc.returncode != 0:
        raise ToolError(f"kernel_report: {cuobjdump} {what} -arch {arch} failed ({proc.returncode}): {message}", 2)
    return proc.stdout


def tool_version(cuobjdump: str) -> str:
    try:
        out = subprocess.run([cuobjdump, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    match = re.search(r"release [\d.]+, (V[\d.]+)", out)
    return match.group(1) if match else "?"


def default_so() -> Optional[str]:
    """The newest ``torch_ext/_C*.so`` of this checkout."""
    found = glob.glob(os.path.join(ROOT, "torch_ext", "_C*.so"))
    return max(found, key=os.path.getmtime) if found else None


def report(so: str, arch: str = "sm_90", cuobjdump: Optional[str] = None,
           bytes_per_iteration: float = BYTES_PER_ITERATION) -> List[Kernel]:
    """The figures of every kernel of ``so`` for ``arch``; raises :class:`ToolError`."""
    cuobjdump = cuobjdump or find_tool("cuobjdump")
    if not cuobjdump or not os.path.isfile(cuobjdump):
        raise ToolError(f"kernel_report: cuobjdump not found; install it: {INSTALL}", 2)
    if not os.path.isfile(so):
        raise ToolError(f"kernel_report: no such file: {so}", 3)
    sass = run_cuobjdump(cuobjdump, "-sass", so, arch)
    if not parse_sass(sass):
        raise ToolError(f"kernel_report: {so} holds no {arch} code (built without CUDA, or without "
                        f"{arch[3:4]}.{arch[4:]} in TORCH_CUDA_ARCH_LIST?)", 3)
    return kernels_from_listings(sass, run_cuobjdump(cuobjdump, "-elf", so, arch),
                                 run_cuobjdump(cuobjdump, "-res-usage", so, arch), bytes_per_iteration)


# --------------------------------------------------------------------------
# Output.


def _number(value: Optional[float], digits: int = 1) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:.{digits}f}"


def table(kernels: Sequence[Kernel]) -> str:
    """A fixed-width table, one kernel a row, sorted by name."""
    head = ("kernel", "instr", "regs", "div", "rcp", "ldg 128/64/32/16/8", "stg 128/64/32/16/8", "st.u8",
            "loop", "el/it", "ins/el")
    rows = [head]
    for k in sorted(kernels, key=lambda k: (k.name, k.demangled)):
        rows.append((
            k.name, str(k.instructions), _number(k.registers), str(k.division_calls), str(k.mufu_rcp + k.mufu_rcp64h),
            "/".join(str(k.ldg.get(w, 0)) for w in WIDTHS), "/".join(str(k.stg.get(w, 0)) for w in WIDTHS),
            str(k.byte_stores), _number(k.hot_loop.instructions if k.hot_loop else None),
            _number(k.elements_per_iteration if k.hot_loop else None), _number(k.instructions_per_element),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive number: {text}")
    return int(value) if value.is_integer() else value


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("so_arg", nargs="?", metavar="SO", help="the extension (same as --so)")
    p.add_argument("--so", help="the extension (default: the newest torch_ext/_C*.so of this checkout)")
    p.add_argument("--arch", default="sm_90", help="the architecture whose code is read (default sm_90)")
    p.add_argument("--filter", metavar="REGEX", help="only kernels whose demangled or short name matches")
    p.add_argument("--json", metavar="PATH", help="also write every figure, one object a kernel ('-': stdout)")
    p.add_argument("--bytes-per-iteration", type=_positive, default=BYTES_PER_ITERATION, metavar="N",
                   help=f"bytes a thread moves a hot-loop iteration (default {BYTES_PER_ITERATION}: 4 x 16 bytes)")
    p.add_argument("--cuobjdump", metavar="PATH",
                   help="the cuobjdump to run (default: on PATH, in the nvidia wheels, in a CUDA toolkit)")
    args = p.parse_args(argv)
    so = args.so or args.so_arg or default_so()
    if so is None:
        print("kernel_report: no torch_ext/_C*.so here: build the extension (make build) or pass --so PATH")
        return 3
    try:
        kernels = report(so, args.arch, args.cuobjdump, args.bytes_per_iteration)
    except ToolError as exc:
        print(exc)
        return exc.status
    if args.filter:
        pattern = re.compile(args.filter)
        kernels = [k for k in kernels if pattern.search(k.demangled) or pattern.search(k.name)]
        if not kernels:
            print(f"kernel_report: no {args.arch} kernel of {so} matches {args.filter!r}")
            return 1
    if args.json:
        document = {
            "so": os.path.abspath(so),
            "arch": args.arch,
            "cuobjdump": tool_version(args.cuobjdump or find_tool("cuobjdump")),
            "bytes_per_iteration": args.bytes_per_iteration,
            "kernels": [k.figures() for k in sorted(kernels, key=lambda k: (k.name, k.demangled))],
        }
        if args.json == "-":
            json.dump(document, sys.stdout, indent=1)
            print()
            return 0
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1)
    print(f"{os.path.relpath(so)}: {len(kernels)} {args.arch} kernels "
          f"(el/it at {_number(args.bytes_per_iteration)} bytes a thread an iteration)")
    print(table(kernels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
