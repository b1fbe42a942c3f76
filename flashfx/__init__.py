"""flashfx: a torch.compile backend that finds attention in your model and fuses it.

    model = torch.compile(model, backend="flashfx")   # no import needed
    print(flashfx.explain(model, x))                   # what was fused, and why not

Importing flashfx registers the backend and the custom op, nothing else.
"""

from flashfx.backend import flashfx_backend, register_if_not_installed
from flashfx.explain import Report, explain
from flashfx.ir import ScoreOp, ScoreProgram
from flashfx.runtime.ops import attention
from flashfx.scoreops import register_score_op

__all__ = ["attention", "explain", "flashfx_backend", "register_score_op", "Report", "ScoreOp", "ScoreProgram"]
__version__ = "0.1.0"

register_if_not_installed()
