"""Score-chain patterns: how a spelling of one step on the scores becomes score-program ops.

A pattern is a plain Python function of the scores `s` (its first parameter) and of named
arguments, traced once with torch.fx and normalized like the user's graph:

    register_pattern("softcap", lambda s, cap: torch.tanh(s / cap) * cap,
                     lambda cap: [Step("scale", c=1 / cap.value), Step("tanh"), Step("scale", c=cap.value)]
                                 if cap.value is not None else "softcap by a tensor")

The matcher walks back from each softmax towards QKᵀ. At each node it tries the registered
patterns whose output is that node, the largest first. A pattern matches when the ops agree
(by canonical name, so `s.tanh()`, `torch.tanh(s)` are one op; `*` and `+` either way round)
and its literal arguments are equal; each parameter binds to what the user's graph has there
(a tensor node, a symbolic size, or a Python value) and `s` binds to the scores before the step,
which the walk continues from. The replacement gets the bound parameters as `Arg`s, by name,
and returns the `Step`s (score ops) the matched nodes become, a string saying why they cannot
be fused, or None to let other patterns try.

The built-in steps below (scale, bias, masks, tanh, clamp) are declared with this same API.
`register_score_op` (flashfx.scoreops) declares a new score op; a pattern says when to use it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx

from flashfx import scoreops
from flashfx.passes.normalize import canon, is_float_cast, normalize


@dataclass(frozen=True)
class Step:
    """One score op a pattern becomes: registry name, tensor operand (an Arg), constant."""

    name: str
    x: "Arg | None" = None
    c: float | None = None


@dataclass(frozen=True, eq=False)
class Arg:
    """What a pattern parameter bound to in the user's graph.

    node:  the graph node (a tensor, or a symbolic size), or None for a Python value
    value: the number when it is known while compiling: a Python number, or a 0-d tensor
           computed from constants only (`torch.tensor(finfo.min)`, `torch.full([], 8.0)`);
           otherwise None
    raw:   the Python value itself when node is None (None for an omitted optional argument)
    """

    node: fx.Node | None = None
    value: float | None = None
    raw: Any = None

    @property
    def meta(self):
        """The example value (a fake tensor or a SymInt/SymFloat) of a graph argument."""
        if self.node is None:
            return None
        return self.node.meta.get("val", self.node.meta.get("example_value"))

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.meta, torch.Tensor)

    @property
    def is_none(self) -> bool:
        return self.node is None and self.raw is None

    @property
    def dtype(self):
        m = self.meta
        return m.dtype if isinstance(m, torch.Tensor) else None

    @property
    def runtime(self) -> bool:
        """A value known only when the graph runs (a tensor or a symbolic size), not a constant."""
        return self.node is not None and self.value is None

    def __repr__(self) -> str:
        if self.node is not None:
            return f"Arg({self.node.name}{'' if self.value is None else f'={self.value:g}'})"
        return f"Arg({self.raw!r})"


@dataclass
class Pattern:
    name: str
    graph: fx.Graph
    params: tuple[str, ...]  # the parameters after `s`
    replacement: Callable
    size: int  # call nodes: larger patterns are tried first

    def __repr__(self) -> str:
        return f"Pattern({self.name!r}, {self.size} ops)"


@dataclass
class Match:
    """A pattern matched at an anchor node: the steps it becomes and what it consumed."""

    pattern: Pattern
    steps: list[Step]
    scores: fx.Node  # the scores before the matched ops: the walk goes on from here
    nodes: list[fx.Node] = field(default_factory=list)  # user nodes the pattern's ops matched


_PATTERNS: dict[str, Pattern] = {}


def register_pattern(name: str, pattern: Callable, replacement: Callable) -> Pattern:
    """Teach the matcher a spelling of a step on the attention scores.

    name:        a key; registering a name again replaces the pattern (so ours can be overridden)
    pattern:     a function whose first parameter is the scores, e.g.
                 `lambda s, cap: torch.tanh(s / cap) * cap`; it is traced with torch.fx, so it
                 may use operators, torch functions and tensor methods, but no data-dependent
                 Python control flow
    replacement: called with the other parameters by name, each bound to an `Arg`; returns a
                 list of `Step`s (score ops from the registry, in the order applied to the
                 scores; an Arg as a step's `x` becomes a tensor operand of the fused op), a
                 string saying why the site cannot be fused, or None when this pattern does not
                 apply (another may)
    """
    params = list(inspect.signature(pattern).parameters)
    if not params:
        raise ValueError("flashfx: a pattern takes the scores as its first parameter")
    gm = fx.symbolic_trace(pattern)
    normalize(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node) or out.op == "placeholder":
        raise ValueError(f"flashfx: pattern {name!r} computes nothing from the scores")
    size = sum(n.op in ("call_function", "call_method") for n in gm.graph.nodes)
    pat = Pattern(name, gm.graph, tuple(params[1:]), replacement, size)
    _PATTERNS[name] = pat
    return pat


def unregister_pattern(name: str) -> None:
    _PATTERNS.pop(name, None)


def patterns() -> list[Pattern]:
    """Registered patterns, in the order the matcher tries them (larger first)."""
    return sorted(_PATTERNS.values(), key=lambda p: -p.size)


# ---- matching one pattern at one node -----------------------------------------------------------

# Parameters of the ops patterns use, so that positional and keyword spellings compare alike
# (`torch.clamp_min(s, a)` is `torch.clamp(s, min=a)`), and the defaults of optional ones.
_SIGNATURES = {
    torch.clamp: ("clamp", ("input", "min", "max")),
    torch.clip: ("clamp", ("input", "min", "max")),
    torch.clamp_min: ("clamp", ("input", "min")),
    torch.clamp_max: ("clamp", ("input", "max")),
    torch.masked_fill: ("masked_fill", ("input", "mask", "value")),
    torch.where: ("where", ("condition", "input", "other")),
    torch.tanh: ("tanh", ("input",)),
    torch.div: ("div", ("input", "other")),
    # elementwise max/min against a bound (XGLM: `torch.max(s, torch.tensor(finfo.min))`); the
    # reduction spelling `torch.max(s, dim)` binds a Python int here, which the steps refuse
    torch.maximum: ("maximum", ("input", "other")),
    torch.max: ("maximum", ("input", "other")),
    torch.minimum: ("minimum", ("input", "other")),
    torch.min: ("minimum", ("input", "other")),
}
_BINARY = {"mul", "div", "add", "sub"}
_COMMUTATIVE = {"mul", "add"}
_DEFAULTS = {"min": None, "max": None, "alpha": 1, "rounding_mode": None}
# Tensor methods that are the torch function of the same name with the same arguments, so a
# pattern written `torch.sign(s)` matches a model's `s.sign()` (and back).
_SAME_AS_FUNCTION = {
    "abs", "exp", "exp2", "expm1", "log", "log1p", "log2", "sign", "sigmoid", "relu", "neg",
    "sqrt", "rsqrt", "square", "reciprocal", "sin", "cos", "erf", "floor", "ceil", "round",
    "trunc", "nan_to_num", "pow", "maximum", "minimum", "logaddexp", "atan", "softplus", "max", "min",
}
_NO_DEFAULT = object()


def _op_name(node: fx.Node):
    """What op a node computes, alike for every spelling we know of it; the target otherwise."""
    if node.op == "call_function" and node.target in _SIGNATURES:
        return _SIGNATURES[node.target][0]
    c = canon(node)
    if c is not None:
        return c
    if node.op == "call_method":
        if node.target in _SAME_AS_FUNCTION and hasattr(torch, node.target):
            fn = getattr(torch, node.target)
            return _SIGNATURES[fn][0] if fn in _SIGNATURES else fn
        return ("method", node.target)
    if node.op == "call_function":
        return node.target
    return None


def _parameters(node: fx.Node) -> tuple[tuple, dict] | None:
    """Parameter names, in order, and their defaults, for the op `node` calls (None: unknown)."""
    fn = node.target if node.op == "call_function" else getattr(torch, str(node.target), None)
    if fn in _SIGNATURES and (node.op == "call_function" or node.target in _SAME_AS_FUNCTION):
        return _SIGNATURES[fn][1], _DEFAULTS
    if _op_name(node) in _BINARY:
        return ("input", "other"), _DEFAULTS
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a Python signature: positions only
        return None
    names = tuple(p for p in sig.parameters if sig.parameters[p].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD))
    defaults = {p: sig.parameters[p].default for p in names if sig.parameters[p].default is not inspect.Parameter.empty}
    return names, defaults


def _call_args(node: fx.Node) -> tuple[dict[str, Any], dict] | None:
    """The node's arguments by parameter name (by position when unknown), and the defaults."""
    params = _parameters(node)
    if params is None:
        if node.kwargs:
            return None
        return {str(i): a for i, a in enumerate(node.args)}, {}
    names, defaults = params
    if len(node.args) > len(names):
        return None
    out = dict(zip(names, node.args))
    for key, value in node.kwargs.items():
        out["input" if key == "self" else key] = value
    return out, defaults


def _strip_casts(x, into: list):
    """The value under float casts (the kernels hold scores in fp32); the casts go to `into`."""
    while isinstance(x, fx.Node) and is_float_cast(x):
        into.append(x)
        x = x.args[0]
    return x


def _literal_eq(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


class _Matcher:
    def __init__(self, pattern: Pattern, is_scores: Callable[[fx.Node], bool]):
        self.pattern = pattern
        self.is_scores = is_scores
        self.bound: dict[str, Any] = {}
        self.nodes: list[fx.Node] = []

    def match(self, p, u) -> bool:
        if isinstance(p, fx.Node) and p.op == "placeholder":
            return self._bind(p, u)
        if isinstance(p, fx.Node):
            casts = []
            u = _strip_casts(u, casts)
            if not isinstance(u, fx.Node) or u.op not in ("call_function", "call_method"):
                return False
            name = _op_name(p)
            if name is None or name != _op_name(u):
                return False
            pcall, ucall = _call_args(p), _call_args(u)
            if pcall is None or ucall is None:
                return False
            (pa, defaults), ua = pcall, ucall[0]
            orders = [ua]
            if name in _COMMUTATIVE and "other" in ua:
                orders.append({**ua, "input": ua["other"], "other": ua["input"]})
            for order in orders:
                saved = dict(self.bound), list(self.nodes)
                if self._match_args(pa, order, defaults):
                    self.nodes += casts + [u]
                    return True
                self.bound, self.nodes = saved
            return False
        if isinstance(u, fx.Node):
            return False  # a literal in the pattern, a graph value in the user's code
        return _literal_eq(p, u)

    def _match_args(self, pa: dict, ua: dict, defaults: dict) -> bool:
        """Argument by argument; one left out on either side stands for its default."""
        for key in sorted(set(pa) | set(ua), key=lambda k: k != "input"):
            p, u = pa.get(key, defaults.get(key, _NO_DEFAULT)), ua.get(key, defaults.get(key, _NO_DEFAULT))
            if p is _NO_DEFAULT or u is _NO_DEFAULT or not self.match(p, u):
                return False
        return True

    def _bind(self, p: fx.Node, u) -> bool:
        name = p.target
        if name == "s":
            casts = []
            u = _strip_casts(u, casts)
            if not (isinstance(u, fx.Node) and self.is_scores(u)):
                return False
            self.nodes += casts
        if name in self.bound:
            prev = self.bound[name]
            return prev is u if isinstance(prev, fx.Node) or isinstance(u, fx.Node) else _literal_eq(prev, u)
        self.bound[name] = u
        return True


def match_at(node: fx.Node, is_scores: Callable[[fx.Node], bool], constant: Callable) -> Match | str | None:
    """The first registered pattern, largest first, whose output is `node`.

    is_scores(n): whether n carries the attention scores (what `s` may bind to).
    constant(n): the number a graph node holds when known while compiling, else None.
    Returns a Match, the reason of the first pattern that matched but declined, or None.
    """
    reason = None
    for pat in patterns():
        m = _Matcher(pat, is_scores)
        out = next(n for n in pat.graph.nodes if n.op == "output").args[0]
        if not m.match(out, node) or "s" not in m.bound:
            continue
        args = {}
        for name in pat.params:
            u = m.bound.get(name)
            if isinstance(u, fx.Node):
                args[name] = Arg(node=u, value=constant(u))
            else:
                value = float(u) if isinstance(u, (int, float)) and not isinstance(u, bool) else None
                args[name] = Arg(value=value, raw=u)
        result = pat.replacement(**args)
        if result is None:
            continue
        if isinstance(result, str):
            reason = reason or result
            continue
        steps = list(result)
        bad = next((why for why in map(_check_step, steps) if why), None)
        if bad:
            return f"pattern {pat.name!r}: {bad}"
        return Match(pat, steps, m.bound["s"], m.nodes)
    return reason


def _check_step(step) -> str | None:
    """What is wrong with a replacement's step, if anything."""
    if not isinstance(step, Step):
        return f"a replacement returns Steps, got {step!r}"
    try:
        d = scoreops.get(step.name)
    except KeyError as e:
        return str(e.args[0])
    if d.operand is not None and (step.x is None or step.x.node is None):
        return f"score op {step.name!r} needs a tensor operand x"
    if d.operand is None and step.x is not None:
        return f"score op {step.name!r} takes no operand"
    if d.has_const and not isinstance(step.c, (int, float)):
        return f"score op {step.name!r} needs a constant c"
    return None


# ---- the built-in steps, declared through the same API ----------------------------------------


def _scale(s, x):
    return s * x


def _scale_steps(x: Arg):
    if x.value is not None:  # a number, or a 0-d tensor of constants: folded
        return [Step("scale", c=x.value)]
    if x.node is not None:  # a tensor (0-d, per head, ...) or a symbolic size: an operand
        return [Step("mul_x", x=x)]
    return f"scale by {x.raw!r} is not supported"


def _div(s, x, mode):
    return torch.div(s, x, rounding_mode=mode)


def _div_steps(x: Arg, mode: Arg):
    if not mode.is_none:
        return "division with a rounding mode"
    if x.value is not None:
        if x.value == 0:
            return "division of the scores by zero"
        return [Step("scale", c=1.0 / x.value)]
    if x.node is not None:
        return [Step("div_x", x=x)]
    return f"scale by {x.raw!r} is not supported"


def _add(s, x, alpha):
    return torch.add(s, x, alpha=alpha)


def _bias_steps(x: Arg, alpha: Arg):
    if alpha.value != 1:
        return "add with alpha"
    if not x.is_tensor:
        return "adding a constant to the scores (a no-op for softmax) is not matched"
    return [Step("bias", x=x)]


def _fill(v: Arg, what: str) -> float | str:
    """The fill of a mask: a number known while compiling; -inf, finfo.min or any finite value."""
    if v.value is None:
        if v.node is not None:
            return f"{what} with a fill value computed at run time (only compile-time constant fills are fused)"
        return f"{what} with fill {v.raw!r}"
    if math.isnan(v.value) or v.value == math.inf:
        return f"{what} with fill {v.value}"
    return v.value


def _masked_fill(s, mask, v):
    return torch.masked_fill(s, mask, v)


def _drop_steps(mask: Arg, v: Arg, what: str = "masked_fill"):
    c = _fill(v, what)
    return c if isinstance(c, str) else [Step("drop", x=mask, c=c)]


def _where_keep(s, mask, v):
    return torch.where(mask, s, v)


def _where_drop(s, mask, v):
    return torch.where(mask, v, s)


def _keep_steps(mask: Arg, v: Arg):
    c = _fill(v, "torch.where")
    return c if isinstance(c, str) else [Step("keep", x=mask, c=c)]


def _tanh(s):
    return torch.tanh(s)


def _clamp(s, lo, hi):
    return torch.clamp(s, lo, hi)


def _clamp_steps(lo: Arg, hi: Arg):
    steps = []
    for bound, op in ((lo, "clamp_min"), (hi, "clamp_max")):
        if bound.is_none:
            continue
        if bound.value is None or math.isnan(bound.value):
            return "clamp with a tensor bound (only constant bounds are fused)"
        steps.append(Step(op, c=bound.value))
    return steps or "clamp without bounds"


def _maximum(s, c):
    return torch.maximum(s, c)


def _minimum(s, c):
    return torch.minimum(s, c)


def _bound_steps(name: str, op: str):
    """maximum(s, c) is clamp_min(s, c), minimum(s, c) is clamp_max(s, c), for a constant c."""
    def steps(c: Arg):
        if not c.is_tensor:
            return f"{name} over a dim is a reduction, not a score op"
        if c.value is None or math.isnan(c.value):
            return f"elementwise {name} with a tensor bound (only constant bounds are fused)"
        return [Step(op, c=c.value)]
    return steps


register_pattern("scale", _scale, _scale_steps)  # s * c, s * x
register_pattern("div", _div, _div_steps)  # s / c, s / x
register_pattern("bias", _add, _bias_steps)  # s + x (additive mask, relative-position bias)
register_pattern("masked_fill", _masked_fill, _drop_steps)  # masked_fill(s, m, v): m True = dropped
register_pattern("where_keep", _where_keep, _keep_steps)  # where(m, s, v): m True = kept
register_pattern("where_drop", _where_drop, lambda mask, v: _drop_steps(mask, v, "torch.where"))
register_pattern("tanh", _tanh, lambda: [Step("tanh")])
register_pattern("clamp", _clamp, _clamp_steps)  # clamp, clamp_min, clamp_max, clip
register_pattern("maximum", _maximum, _bound_steps("max", "clamp_min"))  # maximum(s, c), max(s, c)
register_pattern("minimum", _minimum, _bound_steps("min", "clamp_max"))  # minimum(s, c), min(s, c)
