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
    checkpoint.pt   while the run is not complete: the server state after the last checkpointed
                    round (``runtime.checkpoint_every``), what ``fedmem resume`` continues from
    clients/        per-client files some strategies keep (personal models), one version per round
                    that wrote it: ``clients/<pid>/<name>@<round>.pt``

Every file except ``metrics.jsonl`` is written to a temporary name and renamed,
so a reader never sees half a file; ``metrics.jsonl`` gets whole lines. A run
is complete exactly when ``summary.json`` exists and ``status.json`` says so.

Per-client files are versioned by round because a checkpoint must see the clients as they
were when it was written: a run that dies at round 183 with a checkpoint of round 180 has
clients that already saved rounds 181-183. A client reads the newest version not newer
than its round; the server keeps only the versions a continuation or a resume can read.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmem import __version__
from fedmem.errors import FedmemError

if TYPE_CHECKING:
    import torch

STATUS_RUNNING, STATUS_COMPLETE, STATUS_FAILED, STATUS_INTERRUPTED = (
    "running",
    "complete",
    "failed",
    "interrupted",
)


def write_error(path: Path, exc: OSError) -> FedmemError:
    """The sentence for a file of a run that cannot be written (a full disk, a read-only directory)."""
    return FedmemError(
        f"cannot write {path} ({exc.strerror or exc}); free space or choose another runtime.output_dir"
    )


def _atomic(path: Path, write: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename."""
    _atomic(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, _json_text(obj))


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` via a temporary file and a rename.

    Serialized in memory first: torch's writer turns a failed write (a full disk) into a
    RuntimeError that names neither the file nor the cause.
    """
    import torch  # here, not at the top: readers of a run directory (fedmem report) never need it

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getbuffer())


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


CHECKPOINT = "checkpoint.pt"
CLIENTS = "clients"
_VERSIONED = re.compile(r"^(?P<name>.+)@(?P<round>\d+)\.pt$")


def client_folder(run_dir: str | Path, pid: int) -> Path:
    """Client ``pid``'s folder of saved objects inside the run directory ``run_dir``."""
    return Path(run_dir) / CLIENTS / f"{pid:05d}"


def client_file(folder: Path, name: str, server_round: int) -> Path:
    """Where a client's object ``name`` saved in ``server_round`` lives inside its ``folder``."""
    return folder / f"{name}@{server_round}.pt"


def client_versions(folder: Path) -> dict[str, list[tuple[int, Path]]]:
    """Every versioned file of a client's folder: ``{name: [(round, path), ...]}`` by round."""
    out: dict[str, list[tuple[int, Path]]] = {}
    if not folder.is_dir():
        return out
    for path in folder.iterdir():
        match = _VERSIONED.match(path.name)
        if match:
            out.setdefault(match["name"], []).append((int(match["round"]), path))
    return {name: sorted(versions) for name, versions in out.items()}


def newest_version(folder: Path, name: str, at_most: int) -> Path | None:
    """The newest file of ``name`` saved in a round ``<= at_most``, or None."""
    found = [p for r, p in client_versions(folder).get(name, []) if r <= at_most]
    return found[-1] if found else None


def stale_versions(rounds: list[int], checkpoint: int) -> list[int]:
    """Rounds of a client file nobody can read any more.

    A continuing run reads the newest version; a resume from the checkpoint of round
    ``checkpoint`` (0: none) reads the newest version ``<= checkpoint``. Everything else goes.
    """
    if not rounds:
        return []
    keep = {max(rounds)} | {max((r for r in rounds if r <= checkpoint), default=-1)}
    return [r for r in rounds if r not in keep]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """fedmem's version and a digest of the engine's and the strategies' sources.

    A checkpoint holds it: resuming with changed code would not give the run that an
    uninterrupted one gives.
    """
    digest = hashlib.sha256()
    for package in ("fedmem", "strategies"):
        spec = importlib.util.find_spec(package)
        roots = list(spec.submodule_search_locations or []) if spec else []
        for root in roots:
            for path in sorted(Path(root).rglob("*.py")):
                digest.update(path.relative_to(root).as_posix().encode() + b"\0")
                digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


# the libraries a summary records: the numerical ones decide the numbers, flwr only carries them
NUMERIC_LIBRARIES = ("torch", "numpy", "faiss-cpu", "flwr")


def environment() -> dict[str, str]:
    """What a run's numbers depend on beyond its config: Python, the numerical libraries, fedmem's code.

    The same seed gives the same numbers only under the same versions (two installs, torch 2.15's
    CPU build and 2.14.1's CUDA build, gave the default scenario's global model 87.4 and 87.3 %:
    docs/benchmarks.md), so ``summary.json`` records them and a report names them.
    """
    return dict(_environment())  # a copy: the cached one is shared


@functools.lru_cache(maxsize=1)
def _environment() -> dict[str, str]:
    import torch

    # torch's own version string keeps its build (+cpu, +cu130), which the package metadata drops
    out = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for name in NUMERIC_LIBRARIES[1:]:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["fedmem"] = code_version()
    return out


@dataclass(frozen=True)
class Checkpoint:
    """What a run needs to continue after round ``round`` exactly as if it had not stopped."""

    round: int
    state: dict[str, dict[str, np.ndarray]]  # the server state (named arrays)
    best: dict[str, dict[str, float]]  # best-over-rounds accuracies so far, by kind and label
    config: str  # the run's config as JSON
    environment: Mapping[str, str]  # environment() of the writer, its code version included

    @property
    def code(self) -> str:
        """code_version() of the code that wrote it."""
        return self.environment["fedmem"]


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
        try:
            atomic_write_text(run.path / "config.toml", config_toml)
            run.set_status(STATUS_RUNNING)
        except BaseException:  # a directory without a status is no run: leave none behind
            shutil.rmtree(path, ignore_errors=True)
            raise
        return run

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def set_status(self, status: str, **extra: Any) -> None:
        """Record the run's state (with a time stamp and optional details such as the error).

        A running run also records which process writes it (``host``, ``pid``). On a full disk,
        where not even a temporary copy fits, the existing ``status.json`` is overwritten in
        place (its space is already held), so a run can still say it failed.
        """
        if status == STATUS_RUNNING:
            extra = {"host": socket.gethostname(), "pid": os.getpid(), **extra}
        path = self.path / "status.json"
        text = _json_text({"status": status, "time": time.time(), **extra})
        try:
            atomic_write_text(path, text)
        except FedmemError as exc:
            cause = exc.__cause__
            full = isinstance(cause, OSError) and cause.errno in _DISK_FULL
            if not (full and path.is_file() and _overwrite(path, text.encode())):
                raise

    def live_owner(self) -> str:
        """ "host H, pid P" if a live process on this host is writing this run, else ""."""
        status = self.status()
        pid = status.get("pid")
        if status.get("status") != STATUS_RUNNING or status.get("host") != socket.gethostname():
            return ""
        if not isinstance(pid, int) or pid == os.getpid():
            return ""
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return ""
        except PermissionError:
            pass  # alive, someone else's
        return f"host {status['host']}, pid {pid}"

    def fail(self, exc: BaseException) -> None:
        """Mark the run failed: one sentence in ``status.json``, the traceback in ``traceback.txt``.

        The status comes first and the traceback only if it still fits: on a full disk the
        sentence matters. If not even the status can be written, the error raised says both.
        """
        try:
            self.set_status(STATUS_FAILED, error=error_sentence(exc))
        except FedmemError as status_error:
            raise FedmemError(f"{error_sentence(exc)}; the run is not marked failed: {status_error}") from exc
        with contextlib.suppress(FedmemError):
            atomic_write_text(self.path / "traceback.txt", "".join(traceback.format_exception(exc)))

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one whole JSON line to ``metrics.jsonl``, or nothing.

        A write that fails part-way (a full disk) is cut back to the previous end of the file, so
        readers never meet half a line, and ends in one sentence naming the file and the cause.
        """
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        try:
            fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(self.metrics_path, exc) from exc
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
                raise write_error(self.metrics_path, exc) from exc
        finally:
            os.close(fd)

    def save_state(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Save the final server state (``state.pt``) and its global model, if any (``model.pt``)."""
        tensors = _tensors(state)
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

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write ``checkpoint.pt`` atomically (then :meth:`prune_clients` may drop older client files)."""
        tensors = _tensors(checkpoint.state)
        meta = {
            "round": checkpoint.round,
            "best": checkpoint.best,
            "config": checkpoint.config,
            "environment": dict(checkpoint.environment),
        }
        atomic_torch_save(
            {"state": tensors, "meta": json.dumps(meta), "code": checkpoint.code}, self.path / CHECKPOINT
        )

    def checkpoint(self) -> Checkpoint | None:
        """The last checkpoint, or None if the run wrote none (a damaged one is one sentence)."""
        path = self.path / CHECKPOINT
        if not path.is_file():
            return None
        import torch

        try:
            raw = torch.load(path, weights_only=True)
            meta = json.loads(raw["meta"])
            state = {n: {k: v.numpy() for k, v in w.items()} for n, w in raw["state"].items()}
            return Checkpoint(
                int(meta["round"]),
                state,
                meta["best"],
                meta["config"],
                # a checkpoint of older code has only its code version, and is refused for it
                meta.get("environment", {"fedmem": str(raw["code"])}),
            )
        except Exception as exc:  # a damaged file, whatever torch or json make of it
            raise FedmemError(
                f"{path} is damaged ({type(exc).__name__}); delete it to start the run again from round 1"
            ) from None

    def prune_clients(self, checkpoint: int, pids: Iterable[int] | None = None) -> None:
        """Delete client files that neither a continuation nor a resume from ``checkpoint`` reads.

        ``pids``: only these clients' folders (those that trained this round); None: every client.
        """
        for versions in self._client_versions(pids):
            stale = set(stale_versions([r for r, _ in versions], checkpoint))
            for r, path in versions:
                if r in stale:
                    path.unlink(missing_ok=True)

    def _client_versions(self, pids: Iterable[int] | None = None) -> Iterator[list[tuple[int, Path]]]:
        """The versions of each client file in the folders of ``pids`` (None: every client)."""
        root = self.path / CLIENTS
        if pids is None:
            folders = list(root.iterdir()) if root.is_dir() else []
        else:
            folders = [client_folder(self.path, p) for p in pids]
        for folder in folders:
            yield from client_versions(folder).values()

    def rewind(self, to_round: int) -> None:
        """Forget everything after round ``to_round``: metrics lines and client files (a resume)."""
        # The lines are kept as written (not re-serialized): a resumed run's file is byte-identical.
        kept = [line for line, record in self._metric_lines() if record.get("round", 0) <= to_round]
        atomic_write_text(self.metrics_path, "".join(kept))
        for versions in self._client_versions():
            for r, path in versions:
                if r > to_round:
                    path.unlink()
        for name in ("summary.json", "traceback.txt", "model.pt", "state.pt", "scores.npz"):
            (self.path / name).unlink(missing_ok=True)

    def complete(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json``, then mark the run complete (no summary stays if that fails)."""
        path = self.path / "summary.json"
        atomic_write_json(path, summary)
        try:
            self.set_status(STATUS_COMPLETE)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        (self.path / CHECKPOINT).unlink(missing_ok=True)  # state.pt holds the final state
        self.prune_clients(0)  # nothing resumes a complete run: each client's newest file is enough

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
                f"run {self.path} did not complete (status {status.get('status')!r}{hint}{detail}); "
                f"continue it with: fedmem resume {self.path}"
            )
        return _read_json(summary_path)

    def metrics(self) -> list[dict[str, Any]]:
        """All lines of ``metrics.jsonl``."""
        return [record for _, record in self._metric_lines()]

    def _metric_lines(self) -> list[tuple[str, dict[str, Any]]]:
        """Each non-blank line of ``metrics.jsonl`` as written (newline kept) and parsed."""
        if not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        out = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError:
                raise FedmemError(
                    f"{self.metrics_path} line {number} is not JSON (the file was damaged or cut off); "
                    "re-run the scenario or delete the damaged line."
                ) from None
        return out


def _tensors(state: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
    import torch

    return {name: {k: torch.as_tensor(v) for k, v in w.items()} for name, w in state.items()}


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _overwrite(path: Path, data: bytes) -> bool:
    """Rewrite the small file ``path`` in place, without a temporary copy; whether that worked."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], done)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


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
