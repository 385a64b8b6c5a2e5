"""Helpers and fixtures shared by the tests (tests/unit, tests/integration, tests/faults) and by
the benchmarks that drive the daemon as the tests do.

Test modules import helpers from here (``from tests.support.hub import publish``), never from one
another. Fixtures are registered once, by ``pytest_plugins`` in tests/conftest.py; so that the
unit tier runs without the ML stack, no module here imports onnx or onnxruntime at import time
(the models are built inside the functions that need them).

- ``hub``: the loopback Hub: the ``hub`` fixture, ``publish``, the demo repos, fetch requests
- ``workspace``: a robot's catalog, models folder and hub; ``entry_toml``; the ``workspace`` fixture
- ``daemon``: a real ``mecha10-modeld run`` process and waiting for what nodes are told
- ``faults``: the fault campaigns' process, convergence and store-invariant helpers
- ``serve``: a real ``Server`` on its own thread, proven variant files, a raw line client
- ``systemd_user``: a real ``systemd --user`` manager (fixture) and the user-unit converter
- ``realdata``: fixtures for real trained models, real photographs and the OpenVINO runtime
- ``plans``: plain tables (entries, manifests, states) for the planning and views tests
- ``stores``: bit rot in place, a reconciler over a real store with one derived-model failure
"""
