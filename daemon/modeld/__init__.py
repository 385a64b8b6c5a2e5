"""mecha10-modeld: the model daemon of the mecha10 robot stack.

Pulls ONNX models named in ``model_catalog.toml`` from the Hugging Face Hub, quantizes them in
worker processes, proves every variant on this host, and tells subscribed inference nodes which
file to hot-reload. ``modeld.client`` is what nodes import.
"""

__version__ = "0.1.0"
