"""Helpers of the fault campaigns (tests/faults): find a daemon's worker processes, wait for
convergence, check the store's invariants, and a node that audits every event it is told.

Import what you use explicitly. The daemon is the real ``mecha10-modeld run`` process of
tests/support/daemon.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

from modeld import client
from tests.support.daemon import DaemonProcess

#: retries come quickly in campaigns: the backoff is what is being exercised, not its length
FAST_RETRY_ENV = {"MODELD_RETRY_BACKOFF_BASE_S": "0.2", "MODELD_RETRY_BACKOFF_CAP_S": "1",
                  "MODELD_PULL_ATTEMPTS": "2"}
#: files that must never be seen half-written under their final name
FINAL_NAME = re.compile(r"^(model[^/]*\.onnx|labels\.txt|config\.json|manifest\.json)$")


# -- processes --------------------------------------------------------------------------------

def children_of(pid: int) -> list[int]:
    """Direct children of ``pid``, from the ppid field of /proc/*/stat (no psutil)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name is in parentheses and may itself hold spaces or parentheses
        fields = raw[raw.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def worker_pids(daemon_pid: int) -> list[int]:
    """The daemon's spawn workers (not multiprocessing's resource tracker)."""
    out = []
    for pid in children_of(daemon_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            out.append(pid)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2:].split()[0] != "Z"


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# -- waiting ----------------------------------------------------------------------------------

def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str,
               daemon: DaemonProcess | None = None, interval_s: float = 0.05) -> Any:
    """The first truthy value of ``predicate()``; errors from a daemon between lives count as
    'not yet'."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (OSError, client.DaemonUnavailableError, KeyError, ValueError) as e:
            value, last_error = None, e
        if value:
            return value
        time.sleep(interval_s)
    log = quiet_log(daemon) if daemon is not None else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} "
                         f"(last error: {last_error!r})\n{log}")


def quiet_log(daemon: DaemonProcess, lines: int = 60) -> str:
    """The daemon's log without the connect/disconnect chatter of polling clients."""
    try:
        text = Path(daemon.log_path).read_text(errors="replace")
    except OSError:
        return ""
    kept = [line for line in text.splitlines()
            if '"client_connected"' not in line and '"client_disconnected"' not in line]
    return "\n".join(kept[-lines:])


def model_status(daemon: DaemonProcess, name: str) -> dict:
    return daemon.status()["models"][name]


_JOB_ENDS = {"pulled", "quantized", "proven", "file_repaired", "job_failed", "job_cancelled"}


def activity(daemon: DaemonProcess, name: str) -> str | None:
    """The job running for ``name`` now: 'pulling' | 'quantizing' | 'proving' | 'repairing' |
    None. Read from the daemon's own log (job_started ... pulled/failed/...), because the
    status views are only rebuilt on a reconcile pass, not when a job starts."""
    job = None
    try:
        text = Path(daemon.log_path).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if '"job_' not in line and f'"{name}"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("model") != name:
            continue
        if event.get("event") == "job_started":
            job = event.get("job")
        elif event.get("event") in _JOB_ENDS:
            job = None
    return job


def wait_ready(daemon: DaemonProcess, name: str, variants: set[str], timeout_s: float = 90) -> dict:
    """Wait until ``name`` is ready and offers exactly ``variants``; returns its status."""
    def done():
        st = model_status(daemon, name)
        offered = {v["variant"] for v in st["variants"]}
        return st if st["state"] == "ready" and offered == variants else None
    return wait_until(done, timeout_s, f"{name} ready with {sorted(variants)}", daemon)


def wait_error(daemon: DaemonProcess, name: str, text: str, timeout_s: float = 60) -> dict:
    """Wait until ``name``'s status carries an error whose message contains ``text``."""
    def failed():
        st = model_status(daemon, name)
        err = st["detail"].get("error")
        return st if err and text in err["message"] else None
    return wait_until(failed, timeout_s, f"{name} error containing {text!r}", daemon)


# -- store invariants -------------------------------------------------------------------------

def sha256_of(path: str | Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def final_files(models: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under a final name (model*.onnx, labels.txt,
    config.json, manifest.json) anywhere under ``models``."""
    out = {}
    for path in models.rglob("*"):
        if FINAL_NAME.match(path.name) and not any(p.startswith(".modeld-") for p in path.parts):
            digest = sha256_of(path)
            if digest is not None:
                out[str(path.relative_to(models))] = digest
    return out


def check_manifest_matches_files(models: Path, name: str) -> dict:
    """Every file the manifest records exists with the recorded sha256; onnx files parse."""
    import onnx

    manifest = json.loads((models / name / "manifest.json").read_text())
    for file_name, record in manifest["files"].items():
        path = models / name / file_name
        assert sha256_of(path) == record["sha256"], f"{path} differs from its manifest record"
        if file_name.endswith(".onnx"):
            onnx.load(str(path), load_external_data=False)
    return manifest


def leftovers(models: Path) -> list[str]:
    """Temp files and scratch folders of ours still under ``models`` (the lock is not one)."""
    return sorted(str(p.relative_to(models)) for p in models.rglob(".modeld-*"))


# -- a node that checks what it is told -------------------------------------------------------

class EventAuditor:
    """A subscriber that stays connected across daemon restarts (the client reconnects) and, at
    the moment each ``variant`` event arrives, hashes the file at its path: a file that exists
    with another sha256 is a violation (a node would have loaded the wrong bytes)."""

    def __init__(self, socket_path: Path, models: list[str], *, prefer: str = "fastest") -> None:
        self.sub = client.Subscription(models, socket_path=socket_path, prefer=prefer,
                                       node="auditor", backoff_initial_s=0.02, backoff_max_s=0.2)
        self.variants: list[dict] = []
        self.mismatches: list[tuple[dict, str]] = []
        self.missing: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-auditor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            event = self.sub.next_event(timeout_s=0.2)
            if event is None or event.get("event") != "variant":
                continue
            actual = sha256_of(event["path"])
            self.variants.append(event)
            if actual is None:
                self.missing.append(event)   # deleted by the test since: not a lie of the daemon
                continue
            if actual != event["sha256"]:
                self.mismatches.append((event, actual))
            self.sub.ack(event["model"], event["generation"], ok=actual == event["sha256"],
                         error=None if actual == event["sha256"] else "sha256 mismatch")

    def close(self) -> None:
        self._stop.set()
        self.sub.close()
        self._thread.join(5)

    def __enter__(self) -> "EventAuditor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- untrusted on-disk state ------------------------------------------------------------------

def tree_digest(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (itself included), never following a link: kind, mode, size,
    mtime and content digest (files) or target (links). Equal digests: nothing was written,
    chmod-ed, created or removed there."""
    out: dict[str, tuple] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = os.lstat(path)
        rel = str(path.relative_to(root))
        if os.path.islink(path):
            out[rel] = ("link", os.readlink(path))
        elif path.is_file():
            out[rel] = ("file", st.st_mode, st.st_size, st.st_mtime_ns, sha256_of(path))
        else:
            out[rel] = ("other", st.st_mode, st.st_mtime_ns)
    return out


def make_canary(root: Path) -> Path:
    """A tree beside models/ that no daemon may touch: files of several modes, a config.json
    and a manifest.json a confused daemon might write, a folder."""
    (root / "sub").mkdir(parents=True)
    for name, mode, data in (("secret.bin", 0o600, b"\x00secret" * 64),
                             ("config.json", 0o640, b'{"canary": true}\n'),
                             ("manifest.json", 0o644, b'{"schema": 1, "name": "canary"}\n'),
                             ("sub/model.onnx", 0o600, b"not a model")):
        (root / name).write_bytes(data)
        os.chmod(root / name, mode)
    return root


def store_converged(models: Path, name: str) -> bool:
    """``models/<name>`` is a real folder whose manifest parses and whose every recorded file
    is a regular, owner-readable file with the recorded sha256 (what a healed model looks like
    on disk, whatever was done to it)."""
    import stat

    from modeld.manifest import Manifest

    folder = models / name
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
        if not stat.S_ISREG(os.lstat(folder / "manifest.json").st_mode):
            return False
        manifest = Manifest.from_json((folder / "manifest.json").read_bytes(), name=name)
        if "model.onnx" not in manifest.files:
            return False
        for file_name, record in manifest.files.items():
            st = os.lstat(folder / file_name)
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & stat.S_IRUSR:
                return False
            if sha256_of(folder / file_name) != record.sha256:
                return False
    except (OSError, ValueError):
        return False
    return True


def log_events(daemon: DaemonProcess, event: str, **fields: Any) -> list[dict]:
    """The daemon's JSON log events named ``event`` whose fields include ``fields``."""
    out = []
    try:
        text = Path(daemon.log_path).read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == event and all(doc.get(k) == v for k, v in fields.items()):
            out.append(doc)
    return out
