"""Worker functions run in spawn processes by ``modeld.jobs.JobRunner`` (fetch, quantize, verify,
bench). Only modules here (and ``modeld.testing``) may import onnx, onnxruntime or huggingface_hub.
"""
