"""``train.compile``: the encoders' per-block computations compiled with ``torch.compile`` (inductor).

Only blocks that declare ``compilable = True`` (PaiNN's message and update blocks) are compiled:
they are functions of tensors alone (atom states, edge indices, edge features), and on a CPU
thread most of a step is their memory-bound elementwise products, gathers and scatters forward and
backward, which inductor fuses into fewer passes over the edge tensors. The rest of a step reads
DGL graph objects, which dynamo would break the graph at. Blocks are compiled in place
(``nn.Module.compile``), so parameter names, saved weights and checkpoints are those of the plain
model, and a model trained compiled is loaded and used without compiling.

Shapes are marked dynamic: a batch of other atom and edge counts reuses the compiled code instead
of compiling again. The first steps pay the compilation (15-30 s on one thread; inductor
caches its kernels on disk for the next run). Measured on one thread, same batches interleaved
(bench/results/compile_speed): PaiNN's training step 1.67x faster on MP crystals and 1.47x on QM9
molecules, embeddings within 1.5e-6; MP fine-tuning with two blocks 96 wide ran 25 epochs in
20 minutes instead of 20 (bench/results/crystal_compile). Off by default: it needs a C++
compiler, which a machine with nothing but Python may lack. Compiled blocks are not twice
differentiable, so fine-tuning refuses ``train.compile`` with curvature weighting (Hessian-vector
products); the curvature stage loads models uncompiled.
"""
from __future__ import annotations

from torch import nn

from pipeline import MolmatError


def compiler_available() -> str | None:
    """The C++ compiler inductor would use (``torch._inductor.config.cpp.cxx``), or None when it finds none."""
    from torch._inductor import exc
    from torch._inductor.codecache import cpp_compiler_search
    from torch._inductor.config import cpp

    try:
        return cpp_compiler_search(cpp.cxx)
    except exc.InvalidCxxCompiler:
        return None


def compile_blocks(model: nn.Module) -> int:
    """Compile, in place, every submodule of ``model`` whose class sets ``compilable = True``.

    Returns:
        the number of blocks compiled (0 for a model without compilable blocks, e.g. the MPNN).
    Raises:
        MolmatError: inductor finds no C++ compiler.
    """
    blocks = [m for m in model.modules() if getattr(type(m), "compilable", False)]
    if blocks and compiler_available() is None:
        raise MolmatError("train.compile needs a C++ compiler for torch.compile's CPU code (g++ on PATH, or "
                          "the compiler named by torch._inductor.config.cpp.cxx); install one or set "
                          "train.compile=false")
    for m in blocks:
        m.compile(dynamic=True)
    return len(blocks)
