"""The torch.compile backend: `torch.compile(model, backend="flashfx", options={...})`.

Options:
  inner:    the compiler for the rest of the graph, "inductor" (default), "aot_eager", "eager".
            Left unset, a graph that holds nothing but fused sites runs as it is: inductor would
            have nothing to compile in it, and its runtime would only add host time to each call.
  autotune: False (default): the planner's tiles. True: on the first call of each site at a
            new GPU and shape bucket, time the planner's top candidates and keep the fastest
            in an on-disk cache (FLASHFX_CACHE_DIR, else ~/.cache/flashfx/autotune.json).

`torch.compile(model, backend="flashfx", mode=...)` hands the mode's inductor settings to the
inner inductor compile: "reduce-overhead" puts the whole compiled graph, flashfx's kernels
included, in CUDA graphs; "max-autotune" tunes inductor's own kernels. torch.compile takes
either a mode or options, not both.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

from torch import fx

from flashfx.passes import pipeline

INNER = ("inductor", "aot_eager", "eager")
_OPTIONS = {"inner": "inductor", "autotune": False}


def parse_options(options: dict | None) -> dict:
    opts = dict(_OPTIONS)
    for key, value in (options or {}).items():
        if key not in _OPTIONS:
            raise ValueError(f"flashfx: unknown option {key!r}; known options: {sorted(_OPTIONS)}")
        opts[key] = value
    if opts["inner"] not in INNER:
        raise ValueError(f"flashfx: option inner={opts['inner']!r}; expected one of {INNER}")
    if not isinstance(opts["autotune"], bool):
        raise ValueError(f"flashfx: option autotune={opts['autotune']!r}; expected True or False")
    return opts


def mode_settings(mode: str | None, inner: str) -> dict:
    """Inductor's settings for torch.compile's `mode` (none for the default mode)."""
    if mode in (None, "default"):
        return {}
    if inner != "inductor":
        raise ValueError(f"flashfx: mode={mode!r} sets inductor's options; the inner compiler is {inner!r}")
    import torch._inductor

    try:
        return dict(torch._inductor.list_mode_options(mode))
    except RuntimeError as e:
        raise ValueError(f"flashfx: {e}") from None


def inner_compile(gm: fx.GraphModule, example_inputs, inner: str, mode: str | None = None):
    patches = mode_settings(mode, inner)
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    import torch._inductor.config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    if inductor_config.post_grad_custom_post_pass is None:  # never replace a user's own pass
        patches["post_grad_custom_post_pass"] = _runtime_version()
    return compile_fx(gm, example_inputs, config_patches=patches)


def _runtime_files() -> list[str]:
    """The sources a compiled graph's calls depend on: the ops, their kernels, and this file,
    whose post-grad pass rewrites those calls."""
    root = os.path.dirname(os.path.abspath(__file__))
    return [os.path.join(root, *rel) for rel in (("runtime", "ops.py"), ("runtime", "gpu.py"),
                                                 ("runtime", "cpu.py"), ("codegen", "attention.py"),
                                                 ("backend.py",))]


@lru_cache(maxsize=None)
def _runtime_version():
    """Inductor's post-grad pass for flashfx: its graphs call the ops' kernels directly, and its
    uuid is a hash of flashfx's op and kernel sources.

    Autograd is traced out of the graphs inductor compiles, and they run with gradients off: a
    fused site calls its op's kernel op (ops.KERNEL_OPS), which has no Autograd kernel to pass
    through on the way. Inductor's on-disk graph cache keys a graph by its code, not by what a
    custom op it calls does: after flashfx changes the op's schema or outputs, a cached graph
    would call it the old way. Inductor folds a custom pass's uuid into the key, so this makes
    the cache follow flashfx's runtime.
    """
    import torch
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from flashfx.runtime import ops

    kernels = {getattr(torch.ops.flashfx, name).default: getattr(torch.ops.flashfx, kernel).default
               for name, kernel in ops.KERNEL_OPS.items()}

    class RuntimeVersion(CustomGraphPass):
        def __call__(self, graph):
            for node in graph.nodes:
                if node.op == "call_function" and node.target in kernels:
                    node.target = kernels[node.target]

        def uuid(self):
            digest = hashlib.sha256()
            for path in _runtime_files():
                with open(path, "rb") as f:
                    digest.update(f.read())
            return digest.hexdigest()

    return RuntimeVersion()


def flashfx_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """Fuse every attention site of `gm`, then hand the graph to the inner compiler, with the
    inductor settings of torch.compile's `mode`."""
    opts = parse_options(options)
    mode_settings(mode, opts["inner"])  # a bad mode fails before any pass runs
    pipeline.run(gm, example_inputs)
    if opts["autotune"]:
        _autotune_sites(gm)
    if "inner" not in (options or {}) and mode in (None, "default") and only_fused_sites(gm):
        return gm.forward  # backward through the op's own autograd, as with inner="eager"
    return inner_compile(gm, example_inputs, opts["inner"], mode)


def only_fused_sites(gm: fx.GraphModule) -> bool:
    """Whether every call in `gm` is a fused site or takes one of its outputs apart."""
    import operator

    import torch

    calls = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    return bool(calls) and all(
        n.op == "call_function" and n.target in (torch.ops.flashfx.attention.default, operator.getitem)
        for n in calls)


def _autotune_sites(gm: fx.GraphModule) -> None:
    """Mark every fused site's program for tuning (its kernels stay the same)."""
    import dataclasses

    import torch

    from flashfx.ir import ScoreProgram

    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.flashfx.attention.default:
            args = list(node.args)
            args[4] = dataclasses.replace(ScoreProgram.decode(args[4]), autotune=True).encode()
            node.args = tuple(args)
    gm.recompile()


def register_if_not_installed() -> None:
    """Make backend="flashfx" work from a source tree (PYTHONPATH=.), where no entry point exists.

    An installed flashfx is found through its `torch_dynamo_backends` entry point; registering
    it here as well would make torch's registry reject the name as a duplicate.
    """
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    if "flashfx" in entry_points(group="torch_dynamo_backends").names or "flashfx" in registry._COMPILER_FNS:
        return
    registry.register_backend(flashfx_backend, name="flashfx")
