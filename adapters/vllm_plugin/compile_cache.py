"""A fix for vLLM 0.32's compile cache on the CPU: load the compiled model, don't redo it.

vLLM saves the model it compiled and, on the next start with the same configuration and
sources, loads it back, ending with `compiled_fn.finalize_loading(config)`. That method
belongs to vLLM's own compile backend; the CPU engine compiles with plain inductor, whose
compiled function is a plain function without it. So every load failed ("Compiling model
again due to a load failure ... has no attribute 'finalize_loading'") and every start paid
the whole compile again (about 50 s of a compiled engine's start here). Inductor's function
needs nothing finalized (it binds its compiled code on its first call), so the fix gives it
a `finalize_loading` that does nothing. vLLM still checks that the traced sources are
unchanged before it uses a saved model, and recompiles when they are not.
"""

from __future__ import annotations

from typing import Any

import torch


def _nothing_to_finalize(*args: Any, **kwargs: Any) -> None:
    return None


def patch_compile_cache_load() -> None:
    original = torch.compiler.load_compiled_function

    def load_compiled_function(*args: Any, **kwargs: Any) -> Any:
        loaded = original(*args, **kwargs)
        artifacts = getattr(loaded, "_artifacts", None)
        compiled = getattr(artifacts, "compiled_fn", None)
        if compiled is not None and not hasattr(compiled, "finalize_loading"):
            compiled.finalize_loading = _nothing_to_finalize
        return loaded

    torch.compiler.load_compiled_function = load_compiled_function
