"""modeld.logs: the renderer chosen for where stderr goes (terminal, file/pipe, journal), levels,
standard-library loggers routed the same way, and journal entries with structured fields — the
last one also against a real journal socket in a private mount namespace.
"""

from __future__ import annotations

import json
import logging
import os
import pty
import shutil
import subprocess
import sys
import textwrap

import pytest
import structlog

from modeld import logs
from modeld.errors import HubNotFoundError, UsageError


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch):
    monkeypatch.delenv(logs.MODE_ENV, raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_modeld", False)]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


@pytest.fixture
def log_file(tmp_path):
    with open(tmp_path / "stderr", "w+") as f:
        yield f


def lines_of(f) -> list[str]:
    f.flush()
    f.seek(0)
    return [line for line in f.read().splitlines() if line]


@pytest.mark.parametrize("given, expected", [
    ("info", logging.INFO), ("DEBUG", logging.DEBUG), (" warning ", logging.WARNING),
    ("error", logging.ERROR), (logging.DEBUG, logging.DEBUG),
])
def test_parse_level(given, expected):
    assert logs.parse_level(given) == expected


@pytest.mark.parametrize("bad", ["loud", "", 5, "inf"])
def test_bad_level_is_one_line_usage_error(bad):
    with pytest.raises(UsageError) as caught:
        logs.parse_level(bad)
    assert "\n" not in str(caught.value) and "expected one of" in str(caught.value)


def test_json_lines_when_stderr_is_a_file(log_file):
    assert logs.configure("info", stream=log_file) == "json"
    log = structlog.get_logger("modeld.test")
    log.info("quantized", model="yolov8n", seconds=1.25, size_ratio=0.27)
    log.debug("not at info level", model="x")
    [line] = lines_of(log_file)
    event = json.loads(line)
    assert event["event"] == "quantized" and event["level"] == "info"
    assert event["model"] == "yolov8n" and event["seconds"] == 1.25
    assert event["timestamp"].endswith("Z")


def test_console_renderer_on_a_terminal():
    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            assert logs.configure("debug", stream=tty) == "console"
            structlog.get_logger("t").warning("pull_failed", model="yolov8n")
            tty.flush()
            text = os.read(leader, 65536).decode(errors="replace")
    finally:
        os.close(leader)
        os.close(follower)
    assert "pull_failed" in text and "yolov8n" in text
    assert not text.lstrip().startswith("{")


def test_verbosity_lowers_the_threshold(log_file):
    logs.configure("debug", stream=log_file)
    structlog.get_logger().debug("detail", n=1)
    assert json.loads(lines_of(log_file)[0])["event"] == "detail"


def test_standard_library_loggers_are_routed_the_same_way(log_file):
    logs.configure("info", stream=log_file)
    logging.getLogger("some.library").error("disk %s full", "/var")
    logging.getLogger("some.library").debug("dropped")
    logging.getLogger("watchdog.observers").info("dropped: watchdog is quiet below info... ")
    events = [json.loads(line) for line in lines_of(log_file)]
    assert events[0]["event"] == "disk /var full" and events[0]["level"] == "error"
    assert len(events) == 2   # the watchdog info line passes, debug does not


@pytest.mark.parametrize("name", ["httpx", "onnxruntime.quantization", "root"])
def test_third_party_chatter_is_debug(log_file, name):
    """httpx's request lines, onnxruntime's notes, a sympy fallback: debug, not info/warning."""
    logger = logging.getLogger(None if name == "root" else name)
    logs.configure("info", stream=log_file)
    logger.info('HTTP Request: HEAD http://hub/x "HTTP/1.1 200 OK"')
    logger.warning("Unable to determine if x <= y, treat as equal")
    assert lines_of(log_file) == []
    logs.configure("debug", stream=log_file)
    logger.warning("Unable to determine if x <= y, treat as equal")
    [event] = [json.loads(line) for line in lines_of(log_file)]
    assert event["level"] == "debug"


def test_reconfiguring_does_not_duplicate_handlers(log_file):
    logs.configure("info", stream=log_file)
    logs.configure("info", stream=log_file)
    logging.getLogger("x").error("once")
    assert len(lines_of(log_file)) == 1


def test_forced_format_and_a_bad_one(monkeypatch, log_file):
    monkeypatch.setenv(logs.MODE_ENV, "console")
    assert logs.configure("info", stream=log_file) == "console"
    monkeypatch.setenv(logs.MODE_ENV, "xml")
    with pytest.raises(UsageError, match="MODELD_LOG_FORMAT"):
        logs.configure("info", stream=log_file)


def test_journald_is_chosen_only_when_stderr_is_the_journal_stream(monkeypatch, log_file, tmp_path):
    st = os.fstat(log_file.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logs.choose_mode(log_file) == "journald"
    with open(tmp_path / "redirected", "w") as other:   # `2>file` under systemd: not the journal
        assert logs.choose_mode(other) == "json"


# -- journal entries --------------------------------------------------------------------------

@pytest.mark.parametrize("key, field", [
    ("model", "MODEL"), ("error_type", "ERROR_TYPE"), ("size-ratio", "SIZE_RATIO"),
    ("_private", "PRIVATE"), ("3d", "F_3D"), ("message", "MODELD_MESSAGE"),
    ("priority", "MODELD_PRIORITY"), ("ünï", "N_"),
])
def test_journal_field_names(key, field):
    assert logs.journal_field_name(key) == field


def capture_journal(log_file):
    """configure() in journald mode with a sender that records entries: a stand-in for the
    journal socket (the real socket is exercised below in a private mount namespace)."""
    entries: list[dict] = []

    def send(message, **fields):
        entries.append({"MESSAGE": message, **fields})

    assert logs.configure("info", stream=log_file, mode="journald", journal_send=send) == "journald"
    return entries


def test_journal_entry_has_message_priority_and_upper_case_fields(log_file):
    entries = capture_journal(log_file)
    err = HubNotFoundError("file m.onnx not found in a/b@main", entry="yolov8n",
                           hint="fix filename in the catalog")
    structlog.get_logger("modeld.reconciler").error("pull_failed", model="yolov8n", **err.fields())
    [entry] = entries
    assert entry["PRIORITY"] == "3"
    assert entry["SYSLOG_IDENTIFIER"] == "mecha10-modeld"
    assert entry["MODEL"] == "yolov8n"
    assert entry["ERROR_TYPE"] == "HubNotFoundError"
    assert entry["ENTRY"] == "yolov8n" and entry["HINT"] == "fix filename in the catalog"
    assert entry["EVENT"] == "pull_failed"
    assert entry["MESSAGE"].startswith("pull_failed model=yolov8n error=")
    assert entry["CODE_FILE"] == __file__ and entry["CODE_FUNC"] == \
        "test_journal_entry_has_message_priority_and_upper_case_fields"
    assert lines_of(log_file) == []   # nothing on stderr: the journal has it


def test_journal_entry_carries_exceptions_and_non_string_values(log_file):
    entries = capture_journal(log_file)
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger().exception("crashed", files=["a", "b"], ok=False)
    [entry] = entries
    assert "ValueError: boom" in entry["EXCEPTION"]
    assert entry["FILES"] == '["a", "b"]' and entry["OK"] == "false"
    assert entry["PRIORITY"] == "3"


def test_standard_library_records_reach_the_journal(log_file):
    entries = capture_journal(log_file)
    logging.getLogger("watchdog.observers").warning("inotify watch limit reached")
    [entry] = entries
    assert entry["MESSAGE"] == "inotify watch limit reached"
    assert entry["LOGGER"] == "watchdog.observers" and entry["PRIORITY"] == "4"


REAL_JOURNAL_CHILD = textwrap.dedent("""
    import json, os, socket, subprocess, sys, struct
    # a private /run/systemd: our own datagram socket where sd_journal_sendv writes
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run/systemd"], check=True)
    os.makedirs("/run/systemd/journal")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind("/run/systemd/journal/socket")
    sink.settimeout(5)
    st = os.fstat(sys.stderr.fileno())
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    from modeld import logs
    import structlog
    mode = logs.configure("info")
    structlog.get_logger().warning("variant_refused", model="yolov8n", error_type="VerifyError",
                                   reason="cosine 0.19 < 0.99")
    data = sink.recv(1 << 20)
    fields = {}
    while data:   # sd-journal native protocol: KEY=value\\n, or KEY\\n<le64 size><bytes>\\n
        line, _, rest = data.partition(b"\\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            data = rest
        else:
            key, size = line, struct.unpack("<Q", rest[:8])[0]
            value, data = rest[8:8 + size], rest[9 + size:]
        fields[key.decode()] = value.decode()
    print(json.dumps({"mode": mode, "fields": fields}))
""")


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs root and unshare(1) for a private mount namespace")
def test_a_real_journal_socket_receives_structured_fields(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(REAL_JOURNAL_CHILD)
    env = {k: v for k, v in os.environ.items() if k not in (logs.MODE_ENV, "JOURNAL_STREAM")}
    with open(tmp_path / "stderr", "w") as stderr:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                               str(script)], env=env, stdout=subprocess.PIPE, stderr=stderr,
                              text=True, timeout=60)
    if done.returncode != 0 and "unshare failed" in (tmp_path / "stderr").read_text():
        pytest.skip("mount namespaces are not permitted here")
    assert done.returncode == 0, (tmp_path / "stderr").read_text()
    report = json.loads(done.stdout.strip().splitlines()[-1])
    fields = report["fields"]
    assert report["mode"] == "journald"
    assert fields["MESSAGE"].startswith("variant_refused model=yolov8n")
    assert fields["MODEL"] == "yolov8n" and fields["ERROR_TYPE"] == "VerifyError"
    assert fields["REASON"] == "cosine 0.19 < 0.99"
    assert fields["PRIORITY"] == "4" and fields["SYSLOG_IDENTIFIER"] == "mecha10-modeld"
    assert (tmp_path / "stderr").read_text() == ""   # nothing doubled on stderr
