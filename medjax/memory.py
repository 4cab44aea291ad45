"""What training costs in memory: XLA's plan for the compiled train step beside the process's peak RSS.

XLA plans every buffer of a compiled step ahead of time (``compiled.memory_analysis()``): its arguments
(train state and batch), outputs (the new state, aliased to the donated arguments), temporaries
(activations kept for the backward pass, gradients, optimizer updates) and generated code. The process's
peak resident set is that plan plus what lives outside it (the Python heap, the data pipeline's
buffers, the evaluation step, the allocator's retained pages), so the two side by side say whether a
memory problem is the model's (temporaries: ``train.remat``) or the process's (``--allocator``).

No JAX import: the functions take what JAX returns.
"""

import resource
import sys

_MB = 2**20


def planned_mb(jitted, *args, **kwargs) -> dict[str, float]:
    """XLA's planned buffers (:func:`compiled_mb`) of ``jitted`` (a ``jax.jit`` function) called on
    ``args``/``kwargs``.

    Read before the step first runs on those arguments, the executable it compiles is the one the call
    then uses (jit's cache), so the plan costs no second compilation.
    """
    return compiled_mb(jitted.lower(*args, **kwargs).compile())


def compiled_mb(compiled) -> dict[str, float]:
    """XLA's planned buffers of ``compiled`` (a ``jax.stages.Compiled``), MB: arguments, outputs,
    temporaries, the outputs aliased to donated arguments, generated code, and the total they hold at
    once; empty on a backend that does not plan ahead."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    mb = {
        "arguments": analysis.argument_size_in_bytes / _MB,
        "outputs": analysis.output_size_in_bytes / _MB,
        "temporaries": analysis.temp_size_in_bytes / _MB,
        "aliased": analysis.alias_size_in_bytes / _MB,
        "generated_code": analysis.generated_code_size_in_bytes / _MB,
    }
    mb["total"] = mb["arguments"] + mb["outputs"] + mb["temporaries"] - mb["aliased"]
    return mb


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, MB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MB if sys.platform == "darwin" else peak / 1024


def describe(planned: dict[str, float], peak_rss: float) -> str:
    """One log line: the plan's total and its parts next to the peak RSS."""
    if not planned:
        return f"Memory: peak RSS {peak_rss:.0f} MB (this backend gives no planned buffers)."
    return (
        f"Memory: XLA plans {planned['total']:.0f} MB for the train step (arguments "
        f"{planned['arguments']:.0f}, temporaries {planned['temporaries']:.0f}, outputs not aliased to "
        f"the donated state {planned['outputs'] - planned['aliased']:.0f}); peak RSS {peak_rss:.0f} MB."
    )
