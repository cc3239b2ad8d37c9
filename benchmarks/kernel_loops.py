"""Instructions per register in the CPU kernels' hot loops, as a compiler builds them.

Compiles one kernel source (the flags of setup.py and scripts/check_cross_build.sh)
for the host or, with the distribution's cross g++, for aarch64, disassembles it
and counts the instructions of two kinds of loop in each function:

* pass 1, the fast pass: a loop body with kFlush = 8 FMAs (one register each);
* pass 2, the histogram: a loop body with 16 one-hot shifts and 16 exponent
  shifts (16 registers).

A static count, not a time: it is how the NEON build of the portable kernel can
be compared before and after a change on a machine with no ARM CPU. Which loop
is which variant (with or without the histogram, masked or not) is left to the
reader of the listing (`objdump -d`); the smallest loops of each kind are the
unmasked ones.

    python benchmarks/kernel_loops.py --arch aarch64 [--source csrc/cpu/kernel_generic.cpp]
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = {"aarch64": ("aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump"), "host": ("g++", "objdump")}
# Per architecture: the FMA of pass 1 and the one-hot shift of pass 2.
FMA = re.compile(r"^(fmla|vfmadd\d+ps)$")
ONE_HOT = re.compile(r"^(ushl|sshl|vpsllvd|cvttps2dq)$")
EXPONENT = re.compile(r"^(ushr|v?psrld)$")  # bits >> 23, once per register of pass 2
FLAGS = ["-std=c++20", "-O3", "-fopenmp", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H",
         "-DTORCH_EXTENSION_NAME=_C"]


def disassemble(arch: str, source: str) -> str:
    from torch.utils.cpp_extension import include_paths
    cxx, objdump = TOOLS[arch]
    for tool in (cxx, objdump):
        if not shutil.which(tool):
            sys.exit(f"kernel_loops: {tool} is not installed (Debian: g++-aarch64-linux-gnu)")
    includes = [f"-isystem{p}" for p in include_paths() + [sysconfig.get_paths()["include"]]]
    with tempfile.TemporaryDirectory() as d:
        obj = os.path.join(d, "k.o")
        subprocess.run([cxx, *FLAGS, f"-I{os.path.join(ROOT, 'csrc')}", *includes, "-c", source,
                        "-o", obj], check=True)
        return subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", obj], check=True,
                              capture_output=True, text=True).stdout


def loops(listing: str):
    """(function, kind, instructions, registers, instruction counts by mnemonic) for every
    pass 1 or pass 2 loop body."""
    functions = []
    for line in listing.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:", line)
        if head:
            functions.append((head.group(1), []))
            continue
        insn = re.match(r"\s*([0-9a-f]+):\s+(\S+)\s*(.*)", line)
        if insn and functions:
            functions[-1][1].append((int(insn.group(1), 16), insn.group(2), insn.group(3)))
    for name, body in functions:
        index = {addr: i for i, (addr, _, _) in enumerate(body)}
        found = {}
        for i, (addr, op, args) in enumerate(body):
            target = re.search(r"\b([0-9a-f]+) <", args)
            if not target or not op.startswith(("b", "j", "cb", "tb")):
                continue
            start = index.get(int(target.group(1), 16))
            if start is None or start >= i:
                continue
            ops = collections.Counter(o for _, o, _ in body[start:i + 1])
            fma = sum(n for o, n in ops.items() if FMA.match(o))
            shifts = sum(n for o, n in ops.items() if ONE_HOT.match(o))
            exponents = sum(n for o, n in ops.items() if EXPONENT.match(o))
            size = i + 1 - start
            if fma == 8 and size < 300:
                found[("pass 1", size, 8)] = ops
            elif shifts == 16 and exponents >= 16 and size < 600:
                found[("pass 2", size, 16)] = ops
        short = re.sub(r"torchhealth::cpu::\w+::", "", name)
        short = re.sub(r"\(.*", "", short)
        for kind, size, regs in sorted(found):
            yield short, kind, size, regs, found[(kind, size, regs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(TOOLS), default="aarch64")
    parser.add_argument("--source", default=os.path.join(ROOT, "csrc", "cpu", "kernel_generic.cpp"))
    args = parser.parse_args()
    print(f"{os.path.relpath(args.source, ROOT)} built for {args.arch} by {TOOLS[args.arch][0]} -O3\n")
    print("| function | loop | instructions | per register |")
    print("|---|---|---:|---:|")
    for name, kind, size, regs, _ in loops(disassemble(args.arch, args.source)):
        print(f"| `{name}` | {kind} | {size} | {size / regs:.2f} |")


if __name__ == "__main__":
    main()
