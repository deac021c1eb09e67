"""The run directory: config snapshot, metrics, final model, summary; atomic writes.

Layout of ``runs/<scenario>-<timestamp>/``::

    config.toml     the resolved scenario (``fedmem run`` on it repeats the run)
    status.json     {"status": "running" | "complete" | "failed" | "interrupted", ...}
    metrics.jsonl   one JSON line per round: training stats; aggregate and per-client evaluation
    model.pt        the final global model (torch state dict), when the strategy has one
    state.pt        the final server state: {name: state dict} (IFCA's clusters, SCAFFOLD's c,
                    server optimizer moments)
    scores.npz      per-example scores of every client's predictors (federations of ``fedmem audit``):
                    key ``<pid>/<predictor>/<set>/<field>``, see ``fedmem.client.score_client``
    summary.json    written last, only when the run completes
    traceback.txt   only when the run failed: where (status.json has the one-sentence error)
    clients/        per-client files some strategies keep (personal models)

Every file except ``metrics.jsonl`` is written to a temporary name and renamed,
so a reader never sees half a file; ``metrics.jsonl`` gets whole lines. A run
is complete exactly when ``summary.json`` exists and ``status.json`` says so.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmem.errors import FedmemError

STATUS_RUNNING, STATUS_COMPLETE, STATUS_FAILED, STATUS_INTERRUPTED = (
    "running",
    "complete",
    "failed",
    "interrupted",
)


def _atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename."""
    _atomic(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` via a temporary file and a rename."""
    _atomic(path, lambda fh: torch.save(obj, fh))


def stamped_dir(output_dir: str | Path, prefix: str) -> Path:
    """Create and return ``<output_dir>/<prefix>-<timestamp>`` (``-2``, ``-3``... if it exists)."""
    base = Path(output_dir) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    with _creating(base, "runtime.output_dir"):
        base.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                path.mkdir()
                return path
            except FileExistsError:
                i += 1
                path = base.with_name(f"{base.name}-{i}")


@contextlib.contextmanager
def _creating(path: Path, where: str) -> Iterator[None]:
    """Turn an OS error while making ``path`` into one sentence naming the setting to change."""
    try:
        yield
    except OSError as exc:
        raise FedmemError(
            f"cannot create {path} ({exc.strerror or exc}); {where} must be a directory fedmem can write"
        ) from None


def error_sentence(exc: BaseException) -> str:
    """One line for a user: fedmem's own errors are sentences already; others get their type."""
    text = str(exc).strip() or "(no message)"
    line = text.splitlines()[0]
    return line if isinstance(exc, FedmemError) else f"{type(exc).__name__}: {line}"


class RunDir:
    """A run directory being written (by the server side) or read (by ``fedmem show``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, output_dir: str | Path, scenario: str, config_toml: str) -> RunDir:
        """Make ``<output_dir>/<scenario>-<timestamp>/`` with the config snapshot and a running status."""
        path = stamped_dir(output_dir, scenario)
        with _creating(path, "runtime.output_dir"):
            return cls._start(path, config_toml)

    @classmethod
    def create_at(cls, path: str | Path, config_toml: str) -> RunDir:
        """Make the run directory ``path`` exactly (a sweep names its federations); it must not exist."""
        path = Path(path)
        with _creating(path, "its parent (runtime.output_dir, or the directory resumed)"):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                path.mkdir()
            except FileExistsError:
                raise FedmemError(f"run directory {path} already exists") from None
            return cls._start(path, config_toml)

    @classmethod
    def _start(cls, path: Path, config_toml: str) -> RunDir:
        run = cls(path)
        atomic_write_text(run.path / "config.toml", config_toml)
        run.set_status(STATUS_RUNNING)
        return run

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def set_status(self, status: str, **extra: Any) -> None:
        """Record the run's state (with a time stamp and optional details such as the error)."""
        atomic_write_json(self.path / "status.json", {"status": status, "time": time.time(), **extra})

    def fail(self, exc: BaseException) -> None:
        """Mark the run failed: one sentence in ``status.json``, the traceback in ``traceback.txt``."""
        atomic_write_text(self.path / "traceback.txt", "".join(traceback.format_exception(exc)))
        self.set_status(STATUS_FAILED, error=error_sentence(exc))

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one whole JSON line to ``metrics.jsonl``, or nothing.

        A write that fails part-way (a full disk) is cut back to the previous end of the file, so
        readers never meet half a line, and ends in one sentence naming the file and the cause.
        """
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.fstat(fd).st_size
            try:
                done = 0
                while done < len(data):
                    done += os.write(fd, data[done:])
                os.fsync(fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise FedmemError(
                    f"cannot write {self.metrics_path} ({exc.strerror or exc}); free space or choose "
                    "another runtime.output_dir"
                ) from exc
        finally:
            os.close(fd)

    def save_state(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Save the final server state (``state.pt``) and its global model, if any (``model.pt``)."""
        tensors = {name: {k: torch.as_tensor(v) for k, v in w.items()} for name, w in state.items()}
        if "model" in tensors:
            atomic_torch_save(tensors["model"], self.path / "model.pt")
        atomic_torch_save(tensors, self.path / "state.pt")

    def save_scores(self, scores: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> None:
        """Write clients' per-example scores ``{pid: {predictor: {"<set>/<field>": array}}}`` atomically."""
        flat = {
            f"{pid}/{label}/{key}": np.asarray(values)
            for pid, by_label in scores.items()
            for label, arrays in by_label.items()
            for key, values in arrays.items()
        }
        buf = io.BytesIO()
        np.savez(buf, **flat)  # type: ignore[arg-type]
        atomic_write_bytes(self.path / "scores.npz", buf.getvalue())

    def scores(self) -> dict[int, dict[str, dict[str, np.ndarray]]]:
        """What :meth:`save_scores` wrote."""
        out: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        with np.load(self.path / "scores.npz") as data:
            for key in data.files:
                pid, label, rest = key.split("/", 2)
                out.setdefault(int(pid), {}).setdefault(label, {})[rest] = data[key]
        return out

    def complete(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json``, then mark the run complete."""
        atomic_write_json(self.path / "summary.json", summary)
        self.set_status(STATUS_COMPLETE)

    # ------------------------------------------------------------------ reading

    def is_complete(self) -> bool:
        """Whether this directory holds a run that completed (status and summary both say so)."""
        if not (self.path / "status.json").is_file():
            return False
        return self.status().get("status") == STATUS_COMPLETE and (self.path / "summary.json").is_file()

    def status(self) -> dict[str, Any]:
        """The parsed ``status.json`` (an error if this is not a run directory)."""
        path = self.path / "status.json"
        if not path.is_file():
            raise FedmemError(f"{self.path} is not a fedmem run directory (no status.json)")
        return _read_json(path)

    def summary(self) -> dict[str, Any]:
        """The summary of a complete run; a clear error for a run that did not complete."""
        status = self.status()
        summary_path = self.path / "summary.json"
        if status.get("status") != STATUS_COMPLETE or not summary_path.is_file():
            detail = f": {status['error']}" if status.get("error") else ""
            hint = " (still running, or killed)" if status.get("status") == STATUS_RUNNING else ""
            raise FedmemError(
                f"run {self.path} did not complete (status {status.get('status')!r}{hint}{detail})"
            )
        return _read_json(summary_path)

    def metrics(self) -> list[dict[str, Any]]:
        """All lines of ``metrics.jsonl``."""
        if not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
        out = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise FedmemError(
                    f"{self.metrics_path} line {number} is not JSON (the file was damaged or cut off); "
                    "re-run the scenario or delete the damaged line."
                ) from None
        return out


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file of a run directory; a damaged one is one sentence naming it."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        result = None
    if not isinstance(result, dict):
        raise FedmemError(
            f"{path} is damaged (not a JSON object); the run directory was changed after fedmem "
            "wrote it: re-run the scenario or restore the file."
        )
    return result
