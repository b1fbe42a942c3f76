"""The score program: what happens to attention scores between QK^T and the softmax.

This is the one record the lower layers (planner, codegen, runtime) share. The matcher builds
it from the user's graph; the custom op carries it as a string (a schema cannot hold a Python
object); the CPU path evaluates it with torch; codegen inlines it into Triton.

    s = q @ k^T                      # raw scores, fp32
    for op in program.ops: s = op(s) # scale, bias, masks ... (elementwise, broadcast operands)
    s = causal(s)                    # structural mask: the kernels skip whole blocks
    p = softmax(s, -1)

Each op is named in the score-op registry (`flashfx.scoreops`), which says how to evaluate it
with torch, how to emit it in Triton, and its derivative for the backward pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")
# score ops that only mask: with an infinite fill they commute with a positive scale
INFINITE_MASKS = ("keep", "drop")


@dataclass(frozen=True)
class ScoreOp:
    """One elementwise step on the scores.

    name:    key in the score-op registry ("scale", "bias", "keep", "drop", ...)
    operand: index into the site's tensor operands (a mask or bias), or None
    const:   a constant argument (the scale), or None
    """

    name: str
    operand: int | None = None
    const: float | None = None


@dataclass(frozen=True)
class ScoreProgram:
    """The elementwise program on the scores, plus the structural (block-skippable) mask.

    causal: None, or the alignment of the causal diagonal: "top_left" (query i sees keys
            0..i, as SDPA's is_causal) or "bottom_right" (the last query sees every key, as a
            tril buffer sliced for a KV cache).
    dropout: probability of zeroing each attention probability (training); kept ones are
            scaled by 1 / (1 - dropout). The kernels draw the mask from a counter-based RNG
            seeded per call, so the backward regenerates it instead of storing it.
    autotune: measure the planner's top tile candidates on first use (per GPU and shape
            bucket, cached on disk) instead of taking its first choice. Not part of the math:
            the kernels' source does not depend on it.
    """

    ops: tuple[ScoreOp, ...] = ()
    causal: str | None = None
    dropout: float = 0.0
    autotune: bool = False

    def __post_init__(self):
        if self.causal is not None and self.causal not in CAUSAL_ALIGNMENTS:
            raise ValueError(f"causal must be one of {CAUSAL_ALIGNMENTS} or None, got {self.causal!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def num_operands(self) -> int:
        used = [op.operand for op in self.ops if op.operand is not None]
        return max(used) + 1 if used else 0

    @property
    def scale_then_infinite_masks(self) -> bool:
        """A leading scale, then only masks with an infinite fill, which commute with it (the
        kernels fold log2(e) into such a scale)."""
        ops = self.ops
        return (bool(ops) and ops[0].name == "scale"
                and all(op.name in INFINITE_MASKS and op.const == float("-inf") for op in ops[1:]))

    @property
    def stats_planes(self) -> int:
        """Row statistics the forward saves for the backward, one [B, H, Nq] plane each.

        1, the log-sum-exp, when the program is a positive scale and infinite masks: no score
        is a finite fill, so max + log Σ exp(s - max) loses nothing. Otherwise 2, the row max
        and log Σ exp(s - max) apart: a row of finfo.min fills has a max so large that their
        sum rounds log Σ away, where eager gives the row uniform weights.
        """
        return 1 if self.scale_then_infinite_masks and self.ops[0].const > 0 else 2

    def encode(self) -> str:
        """A stable, compact string: the custom op's `program` argument and the kernel cache key."""
        ops = [[op.name, op.operand, op.const] for op in self.ops]
        raw = {"ops": ops, "causal": self.causal}
        if self.dropout:
            raw["dropout"] = self.dropout
        if self.autotune:
            raw["autotune"] = True
        return json.dumps(raw, separators=(",", ":"))

    @staticmethod
    @lru_cache(maxsize=1024)  # called on every op call: parse each program once
    def decode(text: str) -> "ScoreProgram":
        try:
            raw = json.loads(text)
            ops = tuple(ScoreOp(name, operand, const) for name, operand, const in raw["ops"])
            return ScoreProgram(ops=ops, causal=raw["causal"], dropout=float(raw.get("dropout", 0.0)),
                                autotune=bool(raw.get("autotune", False)))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"flashfx: malformed score program {text!r}: {e}") from None

    def __str__(self) -> str:
        parts = []
        for op in self.ops:
            arg = f"operand{op.operand}" if op.operand is not None else ""
            if op.const is not None:
                arg = (arg + ", " if arg else "") + f"{op.const:g}"
            parts.append(f"{op.name}({arg})")
        if self.causal:
            parts.append(f"causal({self.causal})")
        if self.dropout:
            parts.append(f"dropout({self.dropout:g})")
        return " -> ".join(parts) if parts else "identity"
