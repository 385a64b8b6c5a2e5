"""The suite's one conftest of fixtures: registers the fixture modules of tests/support.

Light on purpose: nothing here (nor in the modules it registers) imports onnx, onnxruntime or
the real-data packages at import time, so the unit tier (tests/unit) runs without the ML stack.
"""

pytest_plugins = [
    "tests.support.hub",
    "tests.support.workspace",
    "tests.support.realdata",
    "tests.support.systemd_user",
]
