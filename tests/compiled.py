"""Run code that compiles real (not interpreted) Triton kernels, from tests that run under
TRITON_INTERPRET=1: in a child process without it, since the two modes do not mix in one
process."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_child(call: str, *args):
    """The JSON result of `call(*args)` ("module:function", args JSON-encodable) in a child
    process without TRITON_INTERPRET."""
    module, function = call.split(":")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = (f"import sys, json; from {module} import {function}; "
            f"print(json.dumps({function}(*json.loads(sys.argv[1]))))")
    run = subprocess.run([sys.executable, "-c", code, json.dumps(args)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
