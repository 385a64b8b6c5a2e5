"""Describe a pulled ONNX file for ``config.json``: inputs, outputs and opset, read from the graph.

Called by the fetch worker before it publishes a model (so a file that is not an ONNX model is
never published). Runs in a worker process only: it imports onnx.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import first_line as _first_line


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | str | None, ...] | None   # ints, symbolic names, None for unknown dims
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape) if self.shape is not None else None,
                "dtype": self.dtype}


@dataclass(frozen=True)
class ModelDescription:
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    opset: int | None          # of the default ("ai.onnx") domain


class NotAnOnnxModel(ValueError):
    """The file does not parse or check as an ONNX model; ``str()`` says why, in one line."""


def describe_model(path: Path) -> ModelDescription:
    """Check ``path`` with the onnx checker and read its graph's signature.

    The checker reads the file itself (in C++, and frees it); the graph is then parsed once,
    without external data, so the weights are never held twice.
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
    except (onnx.checker.ValidationError, DecodeError, ValueError, RuntimeError, OSError) as e:
        raise NotAnOnnxModel(_first_line(e)) from e
    graph = model.graph
    if not graph.output or not graph.node:
        raise NotAnOnnxModel("the graph has no nodes or no outputs")
    initializers = {t.name for t in graph.initializer}
    inputs = tuple(_tensor_info(v) for v in graph.input if v.name not in initializers)
    outputs = tuple(_tensor_info(v) for v in graph.output)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return ModelDescription(inputs=inputs, outputs=outputs, opset=opset)


def _tensor_info(value) -> TensorInfo:
    import onnx

    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return TensorInfo(value.name, None, kind or "unknown")
    tensor = value.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    except (KeyError, ValueError, TypeError):
        dtype = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
    if not tensor.HasField("shape"):
        return TensorInfo(value.name, None, dtype)
    dims = tuple(d.dim_value if d.HasField("dim_value")
                 else (d.dim_param if d.HasField("dim_param") else None)
                 for d in tensor.shape.dim)
    return TensorInfo(value.name, dims, dtype)
