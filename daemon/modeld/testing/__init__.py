"""Test and demo helpers that ship with the package: tiny ONNX models and the loopback hub.

Used by tests, the demo and the benchmarks; never imported by the daemon itself.
"""
