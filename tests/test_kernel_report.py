"""scripts/kernel_report.py: its SASS parser on hand-written listings, and the
kernels' budgets on the built extension's sm_90 code (no GPU needed).

The budgets (``BUDGETS`` below) are what keeps the CUDA quantizer
memory-bound on an H200: no division in the step-form forward, 128-bit loads
and stores, masks the only byte stores, and few instructions an element in
the vectorized main loop. They read the machine code nvcc wrote into
``torch_ext/_C*.so`` with ``cuobjdump``, from the PyPI wheels
``nvidia-cuda-cuobjdump`` and ``nvidia-cuda-nvdisasm`` (requirements/test.txt);
where those are missing, or the extension holds no sm_90 code, those tests
skip and say why, and the parser tests still run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import torch_ext

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "kernel_report.py"
sys.path.insert(0, str(REPO / "scripts"))
import kernel_report  # noqa: E402  (scripts/kernel_report.py)

# --------------------------------------------------------------------------
# The budgets: data for the other engineer to tune. Each is a regex, searched
# in a kernel's "function" (its demangled name without the return type and the
# parameters, e.g. "torch_ext::cuda::(anonymous namespace)::forward_kernel<float,
# torch_ext::cuda::(anonymous namespace)::Steps<3>>"), a figure of the
# script's --json, and a bound ("max" or "min"). A budget that matches no
# kernel fails: its regex no longer names the kernels it was written for.

#: The kernels of both namespaces: the fixed quantizer's and the learnable one's.
NAMESPACES = r"^torch_ext::cuda(_learnable)?::(\(anonymous namespace\)::)?"
#: The elementwise kernels.
ELEMENTWISE = NAMESPACES + r"(forward|backward)_kernel<"
#: The step-form forward (1-4 bits: compare x with thresholds) in float32
#: and bfloat16, of the fixed operator (thresholds found on the host: the
#: kernel never divides) and of the learnable one (found on the device, once
#: a block, before the main loop: that search divides, the loop does not).
STEPS_FORWARD_FIXED = r"^torch_ext::cuda::(\(anonymous namespace\)::)?forward_kernel<(float|c10::BFloat16),.*StepsForm"
STEPS_FORWARD_LEARNABLE = (
    r"^torch_ext::cuda_learnable::(\(anonymous namespace\)::)?(forward|lsq_backward)_kernel<(float|c10::BFloat16),.*StepsForm"
)
#: ... for 2 bits (3 levels), a dtype each, writing the mask (training).
FIXED = r"^torch_ext::cuda::(\(anonymous namespace\)::)?"
LEARNABLE = r"^torch_ext::cuda_learnable::(\(anonymous namespace\)::)?"
STEPS_3_LEVELS_FLOAT = FIXED + r"forward_kernel<float, true,.*StepsForm<float, 3>"
STEPS_3_LEVELS_BFLOAT16 = FIXED + r"forward_kernel<c10::BFloat16, true,.*StepsForm<c10::BFloat16, 3>"
#: The learnable forward writes two masks (0 < x < m, x >= m).
LEARNABLE_3_LEVELS_FLOAT = LEARNABLE + r"forward_kernel<float, true,.*StepsForm<float, 3>"
LEARNABLE_3_LEVELS_BFLOAT16 = LEARNABLE + r"forward_kernel<c10::BFloat16, true,.*StepsForm<c10::BFloat16, 3>"

BUDGETS = {
    # The step form finds the level by comparing x with thresholds, so nothing
    # divides an element: a float division is MUFU.RCP, FFMAs and an
    # FCHK-guarded CALL of __cuda_sm3x_div_rn_noftz_f32_slowpath, about 10
    # instructions an element and a branch and a call in the hot loop.
    "fixed step-form forward: no division call": {
        "kernels": STEPS_FORWARD_FIXED, "figure": "division_calls", "max": 0},
    "fixed step-form forward: no MUFU.RCP": {"kernels": STEPS_FORWARD_FIXED, "figure": "mufu_rcp", "max": 0},
    "learnable step-form forward: no division call in the main loop": {
        "kernels": STEPS_FORWARD_LEARNABLE, "figure": "hot_loop_division_calls", "max": 0},
    "learnable step-form forward: no MUFU.RCP in the main loop": {
        "kernels": STEPS_FORWARD_LEARNABLE, "figure": "hot_loop_mufu_rcp", "max": 0},
    # Data moves as 16-byte vectors (4 a thread an iteration); a kernel without a
    # 128-bit load or store moves it in narrower pieces, many more instructions a byte.
    "elementwise: a 128-bit load": {"kernels": ELEMENTWISE, "figure": "ldg_128", "min": 1},
    "elementwise: a 128-bit store": {"kernels": ELEMENTWISE, "figure": "stg_128", "min": 1},
    # The packed masks are the only bytes stored one at a time: one byte a
    # vector and a mask (2 masks x 4 vectors in the main loop, as many in the
    # tail loop); y and grad_x are stored as vectors (or, in the tail, as
    # whole elements), never byte by byte. The old learnable forward stored y
    # byte by byte: 64 to 132 byte stores a kernel.
    "learnable: byte stores": {"kernels": r"^torch_ext::cuda_learnable::", "figure": "byte_stores", "max": 16},
    # Instructions an element of the hot loop against the H200's break even: it
    # issues ~3.3e13 thread instructions/s (132 SMs x 4 x 32 lanes x ~1.98 GHz)
    # and copies ~4.2e12 B/s. A float32 forward moves 8.125 bytes an element (read
    # 4, write 4, 1/8 mask byte): 5.2e11 elements/s, ~63 instructions an element
    # before the instructions, not the memory, set the pace; bfloat16 moves 4.125
    # bytes: ~32. Half of each keeps the kernel memory-bound with a margin.
    "step-form forward, 3 levels, float: instructions/element": {
        "kernels": STEPS_3_LEVELS_FLOAT,
        "figure": "instructions_per_element", "max": 32,
    },
    "step-form forward, 3 levels, bfloat16: instructions/element": {
        "kernels": STEPS_3_LEVELS_BFLOAT16,
        "figure": "instructions_per_element", "max": 16,
    },
    # The learnable forward also writes the second mask (a compare, a select
    # and a gather an element more) and moves 4.25 bytes a bfloat16 element:
    # break even ~31 instructions, so ~60% of it (8.25 bytes and ~61 for float32).
    "learnable step-form forward, 3 levels, float: instructions/element": {
        "kernels": LEARNABLE_3_LEVELS_FLOAT,
        "figure": "instructions_per_element", "max": 32,
    },
    "learnable step-form forward, 3 levels, bfloat16: instructions/element": {
        "kernels": LEARNABLE_3_LEVELS_BFLOAT16,
        "figure": "instructions_per_element", "max": 20,
    },
}

INSTALL = "python -m pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm (requirements/test.txt)"

# --------------------------------------------------------------------------
# The parser, on a hand-written listing (no tool needed).

KERNEL = "_ZN9torch_ext4cuda12_GLOBAL__N_114forward_kernelIfNS1_5StepsILi3EEEEEvPKT_Pfl"

# An outer loop (0x10-0x100) around the vectorized inner loop (0x20-0xe0: 13
# instructions, one LDG.E.128), a division's fast path (MUFU.RCP, FCHK) and its
# CALL of the slow path at 0x120 (a subroutine after EXIT, as nvcc places it),
# then the BRA-to-self trap and NOP padding.
SASS = f"""
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit

\tcode for sm_90
\t\tFunction : {KERNEL}
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                          /* 0x00000a00ff017b82 */
                                                                                   /* 0x000fe20000000800 */
        /*0010*/                   S2R R2, SR_TID.X ;                              /* 0x0000000000027919 */
                                                                                   /* 0x000e2e0000002100 */
        /*0020*/                   LDG.E.128.CONSTANT R4, desc[UR6][R2.64] ;       /* 0x0000000602047981 */
                                                                                   /* 0x000ea2000c1e9d00 */
        /*0030*/                   LDG.E.64 R8, desc[UR6][R2.64+0x10] ;            /* 0x0000100602087981 */
        /*0040*/                   LDG.E.U16 R10, desc[UR6][R2.64+0x18] ;          /* 0x00001806020a7981 */
        /*0050*/                   LDG.E.S8 R11, desc[UR6][R2.64+0x1a] ;           /* 0x00001a06020b7981 */
        /*0060*/                   MUFU.RCP R12, R13 ;                             /* 0x0000000d000c7308 */
        /*0070*/                   FCHK P1, R4, R13 ;                              /* 0x0000000d04007302 */
        /*0080*/              @!P1 BRA 0xb0 ;                                      /* 0x0000000000089947 */
        /*0090*/                   MOV R14, 0xb0 ;                                 /* 0x000000b0000e7802 */
        /*00a0*/                   CALL.REL.NOINC 0x120 ;                          /* 0x00000000001c7944 */
        /*00b0*/                   STG.E.128 desc[UR6][R6.64], R4 ;                /* 0x0000000406007986 */
        /*00c0*/                   STG.E.U8 desc[UR6][R8.64], R9 ;                 /* 0x0000000908007986 */
        /*00d0*/                   STG.E desc[UR6][R8.64+0x4], R1 ;                /* 0x0000040108007986 */
        /*00e0*/              @!P0 BRA 0x20 ;                                      /* 0xfffffffc004c8947 */
        /*00f0*/                   LDG.E R0, desc[UR6][R2.64] ;                    /* 0x0000000602007981 */
        /*0100*/               @P2 BRA 0x10 ;                                      /* 0xfffffffc00c02947 */
        /*0110*/                   EXIT ;                                          /* 0x000000000000794d */
        /*0120*/                   MUFU.RCP64H R3, R5 ;                            /* 0x0000000500037308 */
        /*0130*/                   RET.REL.NODEC R14 0x0 ;                         /* 0xfffffffc0eb07950 */
        /*0140*/                   BRA 0x140;                                      /* 0xfffffffc00fc7947 */
        /*0150*/                   NOP;                                            /* 0x0000000000007918 */
        /*0160*/                   NOP;                                            /* 0x0000000000007918 */
"""

# What cuobjdump -elf prints of the same cubin: the section table and the
# symbol table that names the subroutine (value 0x120 in section 0x14).
ELF = f"""
Fatbin elf code:
================
arch = sm_90

64-bit ELF: type=ET_EXEC, ABI=8, sm=90, toolkit=13.0, flags=0x9005a04
Sections:
Index Offset   Size ES Align                      Type    Flags Link     Info Name
    3    ea8    1b0 18  8                       SYMTAB        0    2       12 .symtab
   14   2700    180  0 80                     PROGBITS        6    3        3 .text.{KERNEL}

.section .strtab

.section .symtab
 index           value           size      info    other  shndx    name
   0               0               0        0        0      0     (null)
 0x3               0           0x180      0x2     0x10   0x14     {KERNEL}
 0x4               0               0      0x3        0   0x14     .text.{KERNEL}
 0x7           0x120            0x20     0x22        0   0x14     $__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath

"""

RES_USAGE = f"""
Resource usage:
 Common:
  GLOBAL:0
 Function {KERNEL}:
  REG:28 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

DEMANGLED = ("void torch_ext::cuda::(anonymous namespace)::forward_kernel<float, "
             "torch_ext::cuda::(anonymous namespace)::Steps<3> >(float const*, float*, long)")


def fixture_kernel(sass=SASS, elf=ELF, bytes_per_iteration=64):
    # The demangled name given, so that these tests need no c++filt.
    (kernel,) = kernel_report.kernels_from_listings(sass, elf, RES_USAGE, bytes_per_iteration,
                                                    demangler=lambda names: {n: DEMANGLED for n in names})
    return kernel


def test_parser_counts_a_hand_written_kernel():
    k = fixture_kernel()
    assert k.mangled == KERNEL
    assert k.instructions == 20  # 0x000-0x130: the BRA to itself and the NOPs after it are padding
    assert k.registers == 28
    assert (k.calls, k.unnamed_calls, k.division_calls) == (1, 0, 1)
    assert (k.mufu_rcp, k.mufu_rcp64h) == (1, 1)
    assert k.ldg == {128: 1, 64: 1, 16: 1, 8: 1, 32: 1}
    assert k.stg == {128: 1, 8: 1, 32: 1}
    assert k.byte_stores == 1
    assert k.subroutines == [{"name": "$__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath", "start": 0x120,
                              "division": True, "instructions": 2}]
    # Two loops hold the 128-bit load; the hot loop is the inner one.
    assert [(loop.start, loop.end, loop.instructions) for loop in k.loops] == [(0x10, 0x100, 16), (0x20, 0xE0, 13)]
    assert (k.hot_loop.start, k.hot_loop.end, k.hot_loop.instructions, k.hot_loop.wide_loads) == (0x20, 0xE0, 13, 1)
    assert k.dtype == "float" and k.elements_per_iteration == 16
    assert k.instructions_per_element == pytest.approx(13 / 16)
    figures = k.figures()
    assert figures["mufu_rcp"] == 2 and figures["ldg_128"] == 1 and figures["stg_8"] == 1
    assert figures["hot_loop"] == {"start": "0x20", "end": "0xe0", "instructions": 13, "wide_loads": 1,
                                   "division_calls": 1, "mufu_rcp": 1}
    assert figures["hot_loop_division_calls"] == 1 and figures["hot_loop_mufu_rcp"] == 1
    json.dumps(figures)


def test_a_call_no_symbol_names_is_not_counted_as_a_division():
    k = fixture_kernel(elf="")
    assert (k.calls, k.unnamed_calls, k.division_calls) == (1, 1, 0)


def test_bytes_per_iteration_sets_elements_and_instructions_per_element():
    k = fixture_kernel(bytes_per_iteration=32)
    assert k.elements_per_iteration == 8 and k.instructions_per_element == pytest.approx(13 / 8)


def test_names_demangled_and_shortened():
    function = kernel_report.function_of(DEMANGLED)
    assert function == ("torch_ext::cuda::(anonymous namespace)::forward_kernel<float, "
                        "torch_ext::cuda::(anonymous namespace)::Steps<3> >")
    assert kernel_report.template_args(function) == ["float", "torch_ext::cuda::(anonymous namespace)::Steps<3>"]
    assert kernel_report.short_name(function) == "cuda::forward_kernel<float, Steps<3> >"
    learnable = ("torch_ext::cuda_learnable::(anonymous namespace)::forward_kernel<c10::BFloat16, true>")
    assert kernel_report.short_name(learnable) == "cuda_learnable::forward_kernel<BFloat16, true>"
    assert kernel_report.dtype_of("_Z...", learnable) == "c10::BFloat16"
    assert re.search(ELEMENTWISE, function)
    # The budgets' regexes name the kernels as the CUDA sources spell them.
    fixed = ("torch_ext::cuda::(anonymous namespace)::forward_kernel<float, true, "
             "torch_ext::cuda_forms::StepsForm<float, 3> >")
    assert re.search(BUDGETS["step-form forward, 3 levels, float: instructions/element"]["kernels"], fixed)
    assert re.search(STEPS_FORWARD_FIXED, fixed) and not re.search(STEPS_FORWARD_LEARNABLE, fixed)
    learnable_steps = ("torch_ext::cuda_learnable::(anonymous namespace)::forward_kernel<c10::BFloat16, true, "
                       "torch_ext::cuda_forms::StepsForm<c10::BFloat16, 3> >")
    assert re.search(STEPS_FORWARD_LEARNABLE, learnable_steps) and not re.search(STEPS_FORWARD_FIXED, learnable_steps)


@pytest.mark.parametrize("mangled, dtype", [
    (KERNEL, "float"),
    ("_ZN9torch_ext14cuda_learnable12_GLOBAL__N_114forward_kernelIN3c108BFloat16ELb1EEEvPKT_PS5_Phl", "c10::BFloat16"),
    ("_ZN9torch_ext4cuda12_GLOBAL__N_115backward_kernelIN3c104HalfEEEvPKT_PS5_PKhlb", "c10::Half"),
    ("_ZN9torch_ext4cuda12_GLOBAL__N_115backward_kernelIdEEvPKT_PS3_PKhlb", "double"),
    ("_Z2k1Pff", None),
])
def test_dtype_from_a_mangled_name_when_cxxfilt_is_missing(mangled, dtype):
    assert kernel_report.dtype_of(mangled, mangled) == dtype


def test_a_function_listed_apart_counts_in_its_caller():
    # Relocatable device code (-rdc): the slow path is a function of its own
    # section, listed apart, called as CALL.ABS.NOINC 0x0 that a relocation names.
    sass = SASS.replace("CALL.REL.NOINC 0x120 ;", "CALL.ABS.NOINC 0x0 ;") + """
\t\tFunction : __cuda_sm3x_div_rn_noftz_f32_slowpath
        /*0000*/                   MUFU.RCP64H R3, R5 ;                            /* 0x0000000500037308 */
        /*0010*/                   RET.ABS.NODEC R20 0x0 ;                         /* 0x0000000014007950 */
        /*0020*/                   BRA 0x20;                                       /* 0xfffffffc00fc7947 */
"""
    elf = ELF.split(".section .symtab")[0] + f"""
.section .rela.text.{KERNEL}\tRELA
0x90    {KERNEL}    R_CUDA_ABS32_LO_32    0xb0
0xa0    __cuda_sm3x_div_rn_noftz_f32_slowpath    R_CUDA_ABS55_16_34    0x0

"""
    k = fixture_kernel(sass, elf)
    assert (k.calls, k.unnamed_calls, k.division_calls) == (1, 0, 1)
    assert k.instructions == 20 + 2 and k.mufu_rcp64h == 2
    assert k.subroutines == [{"name": "__cuda_sm3x_div_rn_noftz_f32_slowpath", "start": 0x140, "division": True,
                              "instructions": 2}]


def test_no_cuobjdump_is_one_line_and_exit_2(tmp_path):
    so = tmp_path / "_C.so"
    so.write_bytes(b"")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--so", str(so), "--cuobjdump", str(tmp_path / "none")],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.count("\n") == 1 and "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm" in proc.stdout


# --------------------------------------------------------------------------
# The built extension.


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The script's --json figures of the built extension's sm_90 kernels, and its table."""
    if kernel_report.find_tool("cuobjdump") is None:
        pytest.skip(f"cuobjdump not found; install it: {INSTALL}")
    if shutil.which("c++filt") is None:
        pytest.skip("c++filt (binutils) not found: the budgets name kernels by their demangled names")
    if not torch_ext.built_with_cuda():
        pytest.skip("torch_ext was built without its CUDA kernels (torch_ext.built_with_cuda() is False)")
    so = Path(torch_ext._C.__file__)
    out = tmp_path_factory.mktemp("kernel_report") / "kernels.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--so", str(so), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 2:
        pytest.skip(f"{proc.stdout.strip()} ({INSTALL})")
    if proc.returncode == 3:  # no sm_90 code: TORCH_CUDA_ARCH_LIST without 9.0
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow  # the report reads the whole extension's SASS once (about 12 s)
def test_every_kernel_is_reported_and_every_call_named(report):
    document, table = report
    kernels = document["kernels"]
    assert document["arch"] == "sm_90" and kernels
    for k in kernels:
        assert k["name"] in table
        assert k["instructions"] > 0 and k["registers"], k["name"]
        # Every CALL resolved to a symbol: else a division call could hide as an unnamed one.
        assert k["unnamed_calls"] == 0, k["name"]
    names = {k["function"] for k in kernels}
    assert any(re.search(ELEMENTWISE, n) for n in names), sorted(names)


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.slow  # shares the report above
def test_budget(report, budget):
    spec = BUDGETS[budget]
    kernels = [k for k in report[0]["kernels"] if re.search(spec["kernels"], k["function"])]
    if not kernels:
        pytest.fail(f"no kernel matches {spec['kernels']!r}: the budget names kernels that are not there",
                    pytrace=False)
    over = []
    for k in kernels:
        value = k[spec["figure"]]
        if value is None or ("max" in spec and value > spec["max"]) or ("min" in spec and value < spec["min"]):
            bound = f"<= {spec['max']}" if "max" in spec else f">= {spec['min']}"
            over.append(f"{k['name']}: {spec['figure']} = {value}, budget {bound}")
    if over:
        pytest.fail(f"{budget}: {len(over)} of {len(kernels)} kernels over budget:\n" + "\n".join(over), pytrace=False)
