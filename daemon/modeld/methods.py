"""The quantization methods and their options: one table, read by everyone who needs it.

Pure (stdlib and ``variants`` only). The catalog validates ``[models.quantize]`` against it and
fills the defaults (``catalog._parse_quantize``), planning takes the canonical options into the
derivation (``planning.desired_derivation``), and the quantize worker turns them into a recipe
(``workers.recipes.recipe_for``). Adding an option is one line here; a cross-option rule is one
``Rule``, refused by the catalog as a one-line error before any worker runs.

From the measured facts of a non-VNNI AVX2 CPU: U8 weights for ConvInteger/MatMulInteger (S8 is
2-3x slower there), S8 weights with QDQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import QuantizeError
from .variants import FP16, INT8

QUANT_TYPES = ("QUInt8", "QInt8")
CALIBRATE_METHODS = ("MinMax", "Entropy", "Percentile")
FORMATS = ("QDQ", "QOperator")
MAX_SAMPLES = 10_000


@dataclass(frozen=True)
class Option:
    """One method option: its default, and either its allowed values or its type (and range)."""

    default: Any
    choices: tuple[str, ...] | None = None   # allowed values (strings)
    kind: type = str                         # bool | int | str
    minimum: int | None = None
    maximum: int | None = None
    #: handed to the onnxruntime quantizer as a recipe option (``samples`` is not: it says how
    #: many calibration inputs are read)
    recipe: bool = True
    #: sent to the quantize worker and keyed in the derivation; False: the daemon's alone
    #: (``field_samples`` says when a generation of field samples is cut: the generation, not
    #: the count, is what a variant derives from)
    worker: bool = True

    def accepts(self, value: Any) -> bool:
        if self.choices is not None:
            return isinstance(value, str) and value in self.choices
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is int:
            return (isinstance(value, int) and not isinstance(value, bool)
                    and (self.minimum is None or value >= self.minimum)
                    and (self.maximum is None or value <= self.maximum))
        return isinstance(value, self.kind)

    def allowed(self) -> str:
        """What is allowed, for a message."""
        if self.choices is not None:
            return f"one of {', '.join(self.choices)}"
        if self.kind is bool:
            return "true or false"
        if self.kind is int:
            return f"an integer {self.minimum}..{self.maximum}"
        return f"a {self.kind.__name__}"


@dataclass(frozen=True)
class Rule:
    """A combination of option values a method refuses: ``when`` (option -> value) all hold."""

    when: Mapping[str, Any]
    option: str                # the option the error names
    message: str
    hint: str

    def broken_by(self, params: Mapping[str, Any]) -> bool:
        return all(params.get(k) == v for k, v in self.when.items())


@dataclass(frozen=True)
class Method:
    """A quantization method: the variant it makes, its options, its calibration folder."""

    name: str
    variant: str | None                    # None: chosen at build time (``auto``)
    options: Mapping[str, Option]
    #: "required", "optional", or None (not accepted)
    calibration: str | None = None
    rules: tuple[Rule, ...] = ()

    @property
    def chooses(self) -> bool:
        """Picks among candidates by the gates and providers (which are then inputs too)."""
        return self.variant is None


_SAMPLES = Option(32, kind=int, minimum=1, maximum=MAX_SAMPLES, recipe=False)
#: without a calibration folder, calibrate on the nodes' field samples once there are this many
#: (issue 13, ``modeld.samples``)
_FIELD_SAMPLES = Option(32, kind=int, minimum=1, maximum=MAX_SAMPLES, recipe=False, worker=False)

#: method -> its definition; the order is the one error messages list them in
METHODS: dict[str, Method] = {
    "dynamic_int8": Method("dynamic_int8", INT8, {
        "weight_type": Option("QUInt8", QUANT_TYPES),
        "per_channel": Option(False, kind=bool),
        "reduce_range": Option(False, kind=bool)}),
    "static_int8": Method("static_int8", INT8, {
        "samples": _SAMPLES,
        "calibrate_method": Option("MinMax", CALIBRATE_METHODS),
        "format": Option("QDQ", FORMATS),
        "activation_type": Option("QUInt8", QUANT_TYPES),
        "weight_type": Option("QInt8", QUANT_TYPES),
        "per_channel": Option(True, kind=bool),
        "reduce_range": Option(False, kind=bool),
        "field_samples": _FIELD_SAMPLES},
        # without a folder it waits for field samples (modeld.samples)
        calibration="optional",
        rules=(Rule({"activation_type": "QInt8", "weight_type": "QUInt8"}, "activation_type",
                    "static_int8 cannot pair activation_type QInt8 with weight_type QUInt8",
                    "use QUInt8 activations or QInt8 weights"),)),
    "fp16": Method("fp16", FP16, {"keep_io_types": Option(True, kind=bool)}),
    "auto": Method("auto", None, {"samples": _SAMPLES, "field_samples": _FIELD_SAMPLES},
                   calibration="optional"),
}


def broken_rule(method: str, params: Mapping[str, Any]) -> Rule | None:
    """The first cross-option rule of ``method`` that ``params`` break, if any."""
    return next((r for r in METHODS[method].rules if r.broken_by(params)), None)


def canonical(method: str, params: Mapping[str, Any] | None = None, *, entry: str = ""
              ) -> dict[str, Any]:
    """``params`` checked against the table, defaults filled, keys sorted (what the catalog
    makes of a ``[models.quantize]`` table, for callers that build requests without one: the
    ``bench`` command, benchmarks, tests). ``QuantizeError`` names the option."""
    def error(option: str, message: str, hint: str) -> QuantizeError:
        return QuantizeError(message, entry=entry or None, hint=hint, option=option)

    if method not in METHODS:
        raise error("method", f"unknown quantization method {method!r}",
                    f"use one of {', '.join(METHODS)}")
    options = METHODS[method].options
    given = dict(params or {})
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise error(unknown[0], f"unknown option {unknown[0]!r} for method {method}",
                    f"{method} takes {', '.join(options) or 'no options'}")
    out = {}
    for name, option in sorted(options.items()):
        value = given.get(name, option.default)
        if not option.accepts(value):
            raise error(name, f"bad value {value!r} for option {name!r} of method {method}",
                        f"expected {option.allowed()}")
        out[name] = value
    rule = broken_rule(method, out)
    if rule is not None:
        raise error(rule.option, rule.message, rule.hint)
    return out


def worker_params(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The options of canonical ``params`` that the quantize worker receives and the derivation
    keys on (all but the daemon's own, ``Option.worker``), in the table's sorted order."""
    options = METHODS[method].options
    return {k: params[k] for k in sorted(options) if k in params and options[k].worker}


def recipe_options(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The options of canonical ``params`` that the quantizer itself takes."""
    options = METHODS[method].options
    return {k: v for k, v in params.items() if k in options and options[k].recipe}
