"""Pure parts of the operator's view (issue 16): reports, the progress line, who may administer,
the bash completion script, the bench table's arithmetic."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from modeld.admin import Allowed, may_administer
from modeld.benchtable import format_table, ratio_of
from modeld.catalog import parse_catalog
from modeld.cli import build_parser
from modeld.completion import bash_script
from modeld.progress import ProgressDisplay, bytes_detail, parse_bytes
from modeld.reports import format_status, invalid_error, list_document, model_report, status_document
from modeld.serving import ModelView, VariantView
from modeld.variants import Proof, ProviderProof

CPU = "CPUExecutionProvider"
GOOD = '[[models]]\nname = "a"\nrepo = "acme/a"\nfilename = "a.onnx"\n'
BAD = '[[models]]\nname = "b"\nrepo = "acme/b"\nfilename = 5\n'


def proof(variant: str, latency: float, fp32: float) -> Proof:
    return Proof(variant=variant, file_sha256=variant * 8, key="k", checker_ok=True,
                 providers=(ProviderProof(CPU, usable=True, passed=True, latency_ms=latency,
                                          fp32_latency_ms=fp32, speedup=fp32 / latency,
                                          cosine=0.999),))


def view() -> ModelView:
    return ModelView(name="a", state="ready", variants=(
        VariantView("fp32", "/m/a/model.onnx", "fp32" * 8, 100, proof("fp32", 10.0, 10.0)),
        VariantView("int8", "/m/a/model-int8.onnx", "int8" * 8, 30, proof("int8", 7.777, 12.345)),
    ))


def test_ratio_is_computed_from_the_printed_latencies():
    latency, fp32, ratio = ratio_of({"variant": "int8", "latency_ms": 7.777, "fp32_latency_ms": 12.345})
    assert (latency, fp32) == (7.78, 12.35) and ratio == 12.35 / 7.78
    assert ratio_of({"variant": "fp32", "latency_ms": 9.0}) == (9.0, 9.0, 1.0)
    assert ratio_of({"variant": "int8", "latency_ms": None, "speedup": 1.3})[2] is None
    table = format_table([{"variant": "int8", "recipe": "r", "provider": CPU, "latency_ms": 7.777,
                           "fp32_latency_ms": 12.345, "speedup": 0.1, "passed": True}])
    assert "7.78 ms" in table and "12.35 ms" in table and f"{12.35 / 7.78:.2f}x" in table
    assert "0.10x" not in table          # never a ratio from another measurement


def test_model_report_per_provider_evidence():
    report = model_report(view(), [CPU])
    cpu = report["providers"][CPU]
    assert report["served"]["variant"] == "int8" and cpu["variant"] == "int8"
    assert cpu["vs_fp32"] == round(cpu["fp32_latency_ms"] / cpu["latency_ms"], 2)
    assert cpu["cosine"] == 0.999


def test_invalid_entries_stay_visible():
    catalog = parse_catalog(GOOD + BAD, path="cat.toml")
    doc = status_document({"a": view()}, catalog, providers=[CPU],
                          catalog_state={"ok": True, "path": "cat.toml", "entry_errors": ["x"]},
                          mode={"daemon": False, "socket": "/s", "models_dir": "/m"})
    assert doc["models"]["b"]["state"] == "invalid" and "filename" in doc["models"]["b"]["reason"]
    assert re.search(r"^b +invalid ", format_status(doc), re.M)
    assert "filename" in invalid_error(catalog, "b") and invalid_error(catalog, "a") is None
    rows = list_document(catalog, lambda n: False, mode={"daemon": False})["models"]
    assert [(r["name"], r["state"]) for r in rows] == [("a", "ok"), ("b", "invalid")]


def test_broken_catalog_line_says_what_is_still_served():
    doc = status_document({"a": view()}, parse_catalog(GOOD, path="c"), providers=[CPU],
                          catalog_state={"ok": False, "error": "c: TOML syntax error at line 2"},
                          mode={"daemon": True, "pid": 1, "socket": "/s"})
    assert "catalog: BROKEN: c: TOML syntax error at line 2; the daemon keeps the last good " \
           "catalog and still serves 1 model" in format_status(doc)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_download_progress_says_bytes_rate_and_eta():
    assert parse_bytes(bytes_detail("downloading m.onnx", 5, 10)) == ("downloading m.onnx", 5, 10)
    assert parse_bytes("proving on CPU") == ("proving on CPU", None, None)
    clock = Clock()
    display = ProgressDisplay(enabled=False, clock=clock)
    mb = 1 << 20
    display.update("det", "pulling", bytes_detail("downloading model.onnx", 0, 10 * mb), 0.05)
    clock.now = 2.0
    display.update("det", "pulling", bytes_detail("downloading model.onnx", 4 * mb, 10 * mb), 0.4)
    line = display.line()
    assert "4.0 MB/10.0 MB" in line and "at 2.0 MB/s" in line and "ETA 3s" in line
    display.update("mlp", "quantizing", "building candidate 2/5", 0.3)
    assert "quantizing mlp" in display.line() and "building candidate 2/5" in display.line()


def test_log_lines_are_never_written_over_the_bar():
    class Tty:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return True

    tty = Tty()
    display = ProgressDisplay(tty)
    display.update("det", "pulling", "", 0.5)
    display.stream.write("an event\n")
    # the bar is cleared before the line, then drawn again below it
    assert tty.text.endswith("\r\033[Kan event\n\r\033[K" + display.line())


@pytest.mark.parametrize("uid, gid, groups, allowed", [
    (0, 0, set(), True),              # root
    (1000, 1000, set(), True),        # the daemon's user / the socket's owner
    (2000, 50, set(), True),          # primary group is the socket's
    (2000, 2000, {50}, True),         # supplementary group
    (2000, 2000, {7}, False),
    (None, None, set(), False),       # credentials unknown
])
def test_who_may_administer(uid, gid, groups, allowed):
    assert may_administer(uid, gid, frozenset(groups),
                          Allowed(uids=frozenset({1000}), gid=50)) is allowed


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion_completes_commands_options_and_is_valid_bash(tmp_path):
    script = tmp_path / "c.sh"
    script.write_text(bash_script(build_parser()))
    probe = (f"source {script}; COMP_WORDS=(mecha10-modeld do); COMP_CWORD=1; _mecha10_modeld; "
             'echo "${COMPREPLY[@]}"; COMP_WORDS=(mecha10-modeld bench --ca); COMP_CWORD=2; '
             '_mecha10_modeld; echo "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["doctor", "--candidates --catalog"]
