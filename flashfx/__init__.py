"""flashfx: a torch.compile backend that finds attention in your model and fuses it.

    model = torch.compile(model, backend="flashfx")   # no import needed
    print(flashfx.explain(model, x))                   # what was fused, and why not
    flashfx.register_pattern(...)                      # teach it a new step on the scores

Importing flashfx registers the backend and the custom op, nothing else.
"""

from flashfx.backend import flashfx_backend, register_if_not_installed
from flashfx.explain import Report, explain
from flashfx.ir import ScoreOp, ScoreProgram
from flashfx.passes.patterns import Arg, Step, register_pattern, unregister_pattern
from flashfx.runtime.ops import attention
from flashfx.scoreops import register_score_op

__all__ = [
    "Arg", "attention", "explain", "flashfx_backend", "register_pattern", "register_score_op", "Report",
    "ScoreOp", "ScoreProgram", "Step", "unregister_pattern",
]
__version__ = "0.1.0"

register_if_not_installed()
