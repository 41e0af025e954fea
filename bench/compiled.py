"""torch.compile for the benchmarks' compiled references.

A benchmark compiles one reference function and calls it at every shape and mode it measures,
with ``dynamic=False``: one static graph per case, the fastest compiled code. Dynamo keeps at most
``torch._dynamo.config.recompile_limit`` graphs per function (8 by default); past that it runs the
function eagerly with nothing but a logged warning, so a "compiled" column would time the eager
reference from the ninth case on. ``compile_static`` raises the limits first.
"""
import torch

RECOMPILE_LIMIT = 64
ACCUMULATED_RECOMPILE_LIMIT = 4096


def compiled_on_first_call(fn):
    """A function that compiles ``fn`` with :func:`compile_static` when first called (so that
    building a table of implementations compiles nothing) and then calls the compiled one."""
    cache = {}

    def run(*args, **kwargs):
        if "fn" not in cache:
            cache["fn"] = compile_static(fn)
        return cache["fn"](*args, **kwargs)
    return run


def compile_static(fn, **kwargs):
    """``torch.compile(fn, dynamic=False, **kwargs)`` after raising dynamo's recompile limits to
    at least RECOMPILE_LIMIT graphs per function (ACCUMULATED_RECOMPILE_LIMIT in all)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit,
                                             ACCUMULATED_RECOMPILE_LIMIT)
    return torch.compile(fn, dynamic=False, **kwargs)
