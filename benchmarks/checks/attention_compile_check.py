"""Compile the head-dim-384 attention kernels for Hopper on any machine (no GPU) and report their resources.

    python benchmarks/checks/attention_compile_check.py [--ws] [CONFIG ...]

CONFIG: `KernelConfig` fields as `key=value,...` (e.g. `block_n=64,num_stages=1`); default: the shipped
config. With `--ws` the configs are `GluonConfig` fields of the warp-specialized Gluon kernel
(vaebuild/kernels/attention_fwd_gluon.py, e.g. `pingpong=False`), reported by registers, spills and whether ptxas
serialized its wgmma for want of registers (its warning C7512). Each is compiled by Triton for `GPUTarget("cuda", 90, 32)` with the `tt.divisibility=16` hints the
JIT gives the GPU launch (q/k/v views of diffusers' [1, 1, N, 1152] tensor: every pointer and stride is
divisible by 16), then Triton's bundled `ptxas -v` gives registers and spills and `nvdisasm` the
instructions of the key-block loop (the longest backward branch): HGMMA, MUFU, BAR, local loads/stores.
Needs Triton (`pip install triton`); `docs/design/attention_kernel_notes.md` records the results.
"""

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import fields, replace

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vaebuild.kernels import attention_fwd_triton as attention_triton
from vaebuild.kernels.attention_fwd_triton import DEFAULT_CONFIG

TARGET = GPUTarget("cuda", 90, 32)

STRIDES = ["stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh",
           "stride_vn", "stride_ob", "stride_oh", "stride_os", "stride_on"]
LOOP_COUNTS = {"instructions": r"/\*[0-9a-f]{4}\*/", "HGMMA": r"HGMMA", "MUFU": r"MUFU", "BAR": r"\bBAR\b",
               "STL": r"\bSTL\b", "LDL": r"\bLDL\b", "LDG": r"\bLDG", "FMUL": r"\bFMUL"}


def _compile(source_class, kernel, constants, options):
    """`kernel` compiled for sm_90 with bf16 q/k/v, fp32 split partials, `constants` and the JIT's divisibility hints."""
    signature = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*fp32", "Lse": "*fp32"}
    signature |= {name: "i32" for name in [*STRIDES, "H", "N", "blocks_per_split"]}
    signature |= {name: "constexpr" for name in constants}
    names = list(signature)
    divisible = ["Q", "K", "V", "Out", "Lse", *STRIDES, "blocks_per_split"]
    source = source_class(
        kernel, signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible},
    )
    return triton.compile(source, target=TARGET, options=options)


def compile_kernel(config):
    """The compiled Triton `_attention_fwd` for a KernelConfig."""
    constants = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, TMA=config.tma, LAZY=config.lazy_rescale,
                     WARP_SPECIALIZE=config.warp_specialize, SPLIT=True)
    return _compile(ASTSource, attention_triton._attention_fwd, constants,
                    {"num_warps": config.num_warps, "num_stages": config.num_stages})


def compile_ws_kernel(config):
    """The compiled Gluon `_attention_fwd_ws` for a GluonConfig."""
    import torch
    from triton.experimental.gluon._runtime import GluonASTSource

    from vaebuild.kernels import attention_fwd_gluon as attention_gluon

    constants = dict(BLOCK_N=config.block_n, SPLIT=True, PINGPONG=config.pingpong, LAZY=config.lazy_rescale,
                     CONSUMER_REGS=config.consumer_regs,
                     Q_LAYOUT=attention_gluon.shared_layout(attention_gluon.ROWS.value, torch.bfloat16),
                     KV_LAYOUT=attention_gluon.shared_layout(config.block_n, torch.bfloat16))
    return _compile(GluonASTSource, attention_gluon._attention_fwd_ws, constants, {"num_warps": 4})


def report(config, ws=False):
    """One line: registers, spills, shared memory and the key-block loop's instruction counts (for `ws`: whether
    ptxas serialized the wgmma, and the kernel's HGMMA and WARPGROUP.DEPBAR counts)."""
    kernel = compile_ws_kernel(config) if ws else compile_kernel(config)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        open(ptx, "w").write(kernel.asm["ptx"])
        open(cubin, "wb").write(kernel.asm["cubin"])
        ptxas = subprocess.run([os.path.join(tools, "ptxas"), "-v", "--gpu-name", "sm_90a", ptx, "-o", "/dev/null"],
                               capture_output=True, text=True).stderr
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    registers = re.search(r"Used (\d+) registers", ptxas).group(1)
    spills = re.search(r"(\d+) bytes spill stores", ptxas).group(1)
    if ws:
        serialized = "wgmma SERIALIZED (C7512)" if "C7512" in ptxas else "wgmma not serialized"
        return (f"{config}: {registers} registers at launch, {spills} B spilled, {kernel.metadata.shared // 1024} KB shared, "
                f"{serialized}; HGMMA {sass.count('HGMMA')}, WARPGROUP.DEPBAR {sass.count('WARPGROUP.DEPBAR')}")
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*\.(L_x_\d+):", line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA\s+`?\(?\.(L_x_\d+)", line)) and labels.get(m.group(1), i) < i]
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    body = lines[start:end + 1]
    counts = {name: sum(1 for line in body if re.search(pattern, line)) for name, pattern in LOOP_COUNTS.items()}
    return (f"{config}: {registers} registers, {spills} B spilled, {kernel.metadata.shared // 1024} KB shared; "
            "loop " + ", ".join(f"{name} {n}" for name, n in counts.items()))


def parse(text, default):
    """A config of `default`'s type from `key=value,...` over `default`."""
    types = {f.name: f.type for f in fields(default)}
    values = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        values[key] = value == "True" if types[key] in (bool, "bool") else int(value)
    return replace(default, **values)


if __name__ == "__main__":
    ws = "--ws" in sys.argv
    if ws:
        from vaebuild.kernels.attention_fwd_gluon import DEFAULT_GLUON_CONFIG as default
    else:
        default = DEFAULT_CONFIG
    for text in [a for a in sys.argv[1:] if a != "--ws"] or [""]:
        print(report(parse(text, default), ws), flush=True)
