"""The unit tier: pure logic and light I/O, no onnx or onnxruntime imported, runs in seconds (``./dev test --unit``)."""
