"""Pure tables for ``serving.choose``: which variant a node gets for its providers and preference."""

from __future__ import annotations

import pytest

from modeld.serving import Choice, ModelView, Unavailable, VariantView, choose
from modeld.variants import Proof, ProviderProof

CPU, COREML, CUDA = "CPUExecutionProvider", "CoreMLExecutionProvider", "CUDAExecutionProvider"
CONV_INTEGER = "ConvInteger is not implemented for CoreMLExecutionProvider (simulated)"


def pp(provider, speedup=1.0, passed=True, usable=True, reason=""):
    return ProviderProof(provider=provider, usable=usable, passed=passed, reason=reason,
                         speedup=speedup)


def vv(variant, *pps, checker_ok=True, proven=True):
    sha = f"{variant}-sha"
    proof = Proof(variant=variant, file_sha256=sha, key="k", checker_ok=checker_ok,
                  checker_error="" if checker_ok else "bad graph", providers=tuple(pps))
    return VariantView(variant=variant, path=f"/m/{variant}.onnx", sha256=sha, size=1,
                       proof=proof if proven else None)


def model(*variants, reason="", detail=None):
    return ModelView(name="yolov8n", state="ready", variants=tuple(variants), reason=reason,
                     detail=detail or {})


FP32_OK = vv("fp32", pp(CPU), pp(COREML))
INT8_FAST_CPU = vv("int8", pp(CPU, 1.4),
                   pp(COREML, passed=False, usable=False, reason=CONV_INTEGER))
INT8_SLOW = vv("int8", pp(CPU, 0.6))
INT8_TIE = vv("int8", pp(CPU, 1.0))
FP16_FAST = vv("fp16", pp(CPU, 1.2))

# (id, view, providers, prefer, rejected, expected variant, expected provider, reason contains)
CHOICES = [
    ("fastest-int8", model(FP32_OK, INT8_FAST_CPU), [CPU], "fastest", (), "int8", CPU, "1.40x"),
    ("fastest-slow-int8-stays-fp32", model(FP32_OK, INT8_SLOW), [CPU], "fastest", (),
     "fp32", CPU, "fastest"),
    ("tie-goes-to-fp32", model(INT8_TIE, FP32_OK), [CPU], "fastest", (), "fp32", CPU, ""),
    ("provider-changes-answer", model(FP32_OK, INT8_FAST_CPU), [COREML, CPU], "fastest", (),
     "fp32", COREML, ""),
    ("prefer-int8-where-int8-failed", model(FP32_OK, INT8_FAST_CPU), [COREML], "int8", (),
     "fp32", COREML, CONV_INTEGER),
    ("prefer-int8-served", model(FP32_OK, INT8_SLOW), [CPU], "int8", (), "int8", CPU,
     "preferred"),
    ("prefer-int8-not-built-no-detail", model(FP32_OK), [CPU], "int8", (), "fp32", CPU,
     "int8 not built"),
    ("prefer-int8-quantize-disabled-in-catalog",
     model(FP32_OK, detail={"quantize": {"enabled": False, "method": "dynamic_int8"}}),
     [CPU], "int8", (), "fp32", CPU, "int8 not built: quantization disabled"),
    ("prefer-fp16-but-catalog-makes-int8",
     model(FP32_OK, INT8_SLOW, detail={"quantize": {"enabled": True, "method": "dynamic_int8"}}),
     [CPU], "fp16", (), "fp32", CPU, "fp16 not built: quantize method dynamic_int8 makes int8"),
    ("prefer-int8-while-quantizing",
     model(FP32_OK, reason="quantizing 40%", detail={"quantize": {"enabled": True,
                                                                  "method": "auto"}}),
     [CPU], "int8", (), "fp32", CPU, "int8 not built: quantizing 40%"),
    ("prefer-int8-quantize-failed",
     model(FP32_OK, detail={"quantize": {"enabled": True, "method": "static_int8"},
                            "quantize_error": "no calibration images"}),
     [CPU], "int8", (), "fp32", CPU, "quantize failed: no calibration images"),
    ("prefer-fp32-over-faster", model(FP32_OK, INT8_FAST_CPU), [CPU], "fp32", (), "fp32", CPU,
     "preferred"),
    ("prefer-fp16", model(FP32_OK, INT8_FAST_CPU, FP16_FAST), [CPU], "fp16", (), "fp16", CPU, ""),
    ("rejected-int8-goes-to-next", model(FP32_OK, INT8_FAST_CPU), [CPU], "fastest",
     [("int8-sha", CPU)], "fp32", CPU, ""),
    ("rejected-on-other-provider-only", model(FP32_OK, INT8_FAST_CPU), [CPU], "fastest",
     [("int8-sha", COREML)], "int8", CPU, ""),
    ("prefer-int8-rejected-says-so", model(FP32_OK, INT8_FAST_CPU), [CPU], "int8",
     [("int8-sha", CPU)], "fp32", CPU, "rejected by this node"),
    ("unproven-provider-skipped", model(FP32_OK, INT8_FAST_CPU), [CUDA, CPU], "fastest", (),
     "int8", CPU, "skipped CUDAExecutionProvider"),
    ("fp32-usable-not-passed-is-served",
     model(vv("fp32", pp(CPU, passed=False, reason="slow"))), [CPU], "fastest", (),
     "fp32", CPU, ""),
    ("checker-failed-int8-ignored", model(FP32_OK, vv("int8", pp(CPU, 3.0), checker_ok=False)),
     [CPU], "fastest", (), "fp32", CPU, ""),
    ("unproven-int8-ignored", model(FP32_OK, vv("int8", pp(CPU, 3.0), proven=False)),
     [CPU], "fastest", (), "fp32", CPU, ""),
    ("fastest-among-three", model(FP32_OK, INT8_FAST_CPU, FP16_FAST), [CPU], "fastest", (),
     "int8", CPU, ""),
]


@pytest.mark.parametrize("view,providers,prefer,rejected,variant,provider,reason",
                         [c[1:] for c in CHOICES], ids=[c[0] for c in CHOICES])
def test_choice(view, providers, prefer, rejected, variant, provider, reason):
    got = choose(view, providers, prefer, frozenset(rejected))
    assert isinstance(got, Choice), got
    assert (got.variant, got.provider) == (variant, provider)
    assert got.sha256 == f"{variant}-sha" and got.path == f"/m/{variant}.onnx"
    assert reason in got.reason


# (id, view, providers, rejected, every text the reason must contain)
UNAVAILABLE = [
    ("no-files", model(reason="downloading 40%"), [CPU], (),
     ["downloading 40%", "CPUExecutionProvider: no file yet"]),
    ("nothing-proven", model(vv("fp32", proven=False)), [CPU, COREML], (),
     ["CPUExecutionProvider: fp32 not proven yet", "CoreMLExecutionProvider: fp32 not proven yet"]),
    ("everything-rejected", model(FP32_OK, INT8_FAST_CPU), [CPU],
     [("int8-sha", CPU), ("fp32-sha", CPU)], ["fp32 rejected by this node", "int8 rejected"]),
    ("provider-never-proven", model(FP32_OK), [CUDA], (),
     ["CUDAExecutionProvider: fp32 not proven on CUDAExecutionProvider"]),
    ("failed-everywhere", model(vv("fp32", pp(CPU, usable=False, passed=False,
                                              reason="Load failed: NoSuchOp"))), [CPU], (),
     ["Load failed: NoSuchOp"]),
    ("checker-failed", model(vv("fp32", pp(CPU), checker_ok=False)), [CPU], (),
     ["fp32 failed the onnx checker: bad graph"]),
]


@pytest.mark.parametrize("view,providers,rejected,texts", [c[1:] for c in UNAVAILABLE],
                         ids=[c[0] for c in UNAVAILABLE])
@pytest.mark.parametrize("prefer", ["fastest", "int8", "fp32"])
def test_unavailable(view, providers, rejected, texts, prefer):
    got = choose(view, providers, prefer, frozenset(rejected))
    assert isinstance(got, Unavailable), got
    for text in texts:
        assert text in got.reason


def test_choice_is_pure_and_deterministic():
    v = model(FP32_OK, INT8_FAST_CPU, FP16_FAST)
    assert len({choose(v, [CPU, COREML], p) for p in ["fastest"] * 5}) == 1
