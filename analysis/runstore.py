"""The run store: a folder of analysis runs, one sub-folder each, shared by the CLI and the dashboard.

A run folder is what `analysis.runs.analyze_to_directory` writes (run.json, trials.jsonl,
analysis.json, layers.csv; the CLI adds report.html) plus `meta.json`, the run's changing record:

    {"schema": "quantlens.run-meta/1", "id": "20250101-120000-sample-cnn-1a2b", "created": 1735732800.0,
     "status": "running", "model": "sample:cnn", "data": "sample:cnn (calibration split)",
     "inputs": {"model_spec": "sample:cnn", "data_spec": "sample:cnn", ...}, "config": {...},
     "pid": 4242, "host": "box", "seconds": 12.3, "layers": 8, "trials": 40, "error": null}

run.json is fixed when the sweep starts and `--resume` checks it against the new inputs; meta.json
changes while the run goes (status, timings), so it is a file of its own, rewritten atomically.
Status is one of running, done, failed, cancelled, interrupted. A folder without meta.json (a CLI
run from an older version) still opens: its status comes from the files present. "running" is only
believed while the process that wrote it (pid on host) is alive; otherwise the run was interrupted.

Dashboard run folders from before the store moved here (meta.json schema
"quantlens.dashboard-run/1") have the same fields and open unchanged.

The store never imports Streamlit: the dashboard passes its store folder (QUANTLENS_RUNS_DIR) in.

Files on disk, read and written the same way everywhere (the CLI, the run store, reports, maps):
- `write_atomic` writes a temp file and renames it over the target (never half a file, a full disk
  names the file);
- `write_output` (what the CLI writes its single-file outputs with) also runs `check_writable`
  first, which refuses to replace a file quantlens did not write (or that was edited since it did)
  unless forced and never lets an output replace one of the command's own inputs, and records the
  new file's sha256 in its folder's `.quantlens-files.json`. A run folder's own files are
  recognised by the folder's run record instead (`analysis.runs.check_run_folder`);
- `read_regular` reads only regular files of bounded size (a FIFO, /dev/zero or a 50 GB file named
  like a run's file is refused with one line instead of hanging or filling memory).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Collection

RUN_META = "meta.json"
MAX_META_BYTES = 1 << 20  # a few hundred bytes in practice
META_SCHEMA = "quantlens.run-meta/1"
STATUSES = ("running", "done", "failed", "cancelled", "interrupted")
MANIFEST = ".quantlens-files.json"  # per folder: the sha256 of every file quantlens wrote there
MANIFEST_SCHEMA = "quantlens.files/1"
LOCK = ".quantlens.lock"
MAX_READ_BYTES = 1 << 30  # a run's own files (analysis.json of a big model is tens of MB)


class FileSafetyError(ValueError):
    """A file that must not be read (not a regular file, too big) or written (not ours, an input)."""


# --- files: read bounded, write atomically, never over what is not ours ---------------------------------


def read_regular(path: str | Path, what: str = "file", max_bytes: int = MAX_READ_BYTES) -> str:
    """The text of `path`, which must be a regular file of at most `max_bytes` (FileNotFoundError
    if missing). Opened without blocking and checked on the open descriptor, so a FIFO or device
    swapped in after a check cannot hang the read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FileSafetyError(f"cannot read {what} {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileSafetyError(f"{what} {path} is not a regular file (a FIFO, device or socket); "
                                  "point at the file itself")
        if info.st_size > max_bytes:
            raise FileSafetyError(f"{what} {path} is {info.st_size >> 20} MiB, more than the {max_bytes >> 20} MiB "
                                  "such a file can be; it is not one quantlens wrote")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileSafetyError(f"{what} {path} grew past {max_bytes >> 20} MiB while being read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FileSafetyError(f"{what} {path} is not UTF-8 text; it is not one quantlens wrote") from None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, str]:
    try:
        payload = json.loads(read_regular(folder / MANIFEST, "manifest", 16 << 20))
    except (OSError, ValueError):
        return {}
    files = payload.get("files") if isinstance(payload, dict) else None
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def _record(path: Path, digest: str) -> None:
    """Remember that quantlens wrote `path` with this content (best effort: a folder we cannot
    write the manifest into only means the file is not recognised as ours later)."""
    folder = path.parent
    files = {**_manifest(folder), path.name: digest}
    tmp = folder / f".{MANIFEST}.{uuid.uuid4().hex[:6]}"
    try:
        tmp.write_text(json.dumps({"schema": MANIFEST_SCHEMA, "files": files}, indent=1))
        os.replace(tmp, folder / MANIFEST)
    except OSError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def record_written(path: str | Path) -> None:
    """Record a file quantlens just wrote by other means (a toolchain's own save) as its own."""
    path = Path(path)
    if path.is_file():
        _record(path, sha256_file(path))


def written_by_quantlens(path: str | Path) -> bool:
    """Whether quantlens wrote `path` and nobody changed it since (its sha256 is the one recorded)."""
    path = Path(path)
    recorded = _manifest(path.parent).get(path.name)
    try:
        return recorded is not None and path.is_file() and sha256_file(path) == recorded
    except OSError:
        return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_writable(path: str | Path, *, force: bool = False, inputs: Collection[str | Path | None] = (),
                   flag: str = "--force") -> None:
    """Refuse (one line) to write `path` over one of `inputs`, over a directory or special file, or
    over a file quantlens did not write (or that was edited since) unless `force`."""
    path = Path(path)
    for given in inputs:
        if given and _same_file(path, Path(given)):
            raise FileSafetyError(f"{path} is also an input of this command: writing it would destroy the input; "
                                  "write the output to another file")
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir():
        raise FileSafetyError(f"{path} is a directory; name a file to write")
    if not path.is_file():
        raise FileSafetyError(f"{path} is not a regular file (a FIFO, device or dangling link); name another output")
    if not force and not written_by_quantlens(path):
        raise FileSafetyError(f"{path} already exists and was not written by quantlens (or was edited since); "
                              f"pass {flag} to overwrite it, or choose another output")


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)`, then rename tmp over `path`: a reader, or a crash mid-write, sees the old file
    or the new one, never half of one (the rename is atomic within a folder). A failed write (full
    disk, no permission) leaves the old file and raises one line naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)
        raise FileSafetyError(f"cannot write {path}: {reason}; the previous version (if any) is unchanged") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_output(path: str | Path, write: Callable[[Path], Any], *, force: bool = False,
                 inputs: Collection[str | Path | None] = ()) -> Path:
    """`check_writable`, then `write_atomic` (creating the folder), then `record_written`: how a
    command writes a single-file output the user names."""
    path = Path(path)
    check_writable(path, force=force, inputs=inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, write)
    record_written(path)
    return path


@contextlib.contextmanager
def locked(folder: str | Path, what: str = "this folder"):
    """Hold an exclusive lock on `folder` for the block; a second holder (any process, or another
    open in this one) is refused at once with one line instead of interleaving its writes."""
    folder = Path(folder)
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; the meta.json owner check still applies
        yield
        return
    handle = open(folder / LOCK, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FileSafetyError(f"{what} is in use by another quantlens process; wait for it to finish, "
                                  "or use another folder") from None
        yield
    finally:
        handle.close()  # closing releases the lock


@dataclass(frozen=True)
class Inputs:
    """The model and data of a run, as specs `analysis.loading` understands."""

    model_spec: str  # "sample:cnn", "path/model.pt2" or "path/file.py:factory"
    data_spec: str  # "sample:cnn" or a data file
    weights: str | None = None  # state dict for a factory
    eval_spec: str | None = None  # evaluation data file; None: the sample's evaluation split / the calibration data
    task: str | None = None
    label: str = ""  # shown in run lists
    data_label: str = ""

    @property
    def is_sample(self) -> bool:
        return self.model_spec.startswith("sample:")

    def eval_source(self) -> tuple[str, str]:
        """(spec, split) of the evaluation data."""
        if self.eval_spec:
            return self.eval_spec, "calibration"
        if self.data_spec.startswith("sample:"):
            return self.data_spec, "evaluation"
        return self.data_spec, "calibration"


def inputs_from_dict(payload: Any) -> Inputs | None:
    """Inputs recorded in meta.json (unknown keys ignored); None when missing or unusable."""
    if not isinstance(payload, dict):
        return None
    names = {f.name for f in fields(Inputs)}
    try:
        return Inputs(**{k: v for k, v in payload.items() if k in names})
    except TypeError:  # model_spec or data_spec missing
        return None


@dataclass(frozen=True)
class RunInfo:
    id: str
    path: Path
    status: str  # one of STATUSES
    model: str  # the run's label
    data: str
    created: float
    seconds: float | None = None
    error: str | None = None
    inputs: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    layers: int | None = None
    trials: int | None = None
    pid: int | None = None  # the process that runs (or ran) it
    host: str | None = None

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def started(self) -> bool:
        """The sweep itself began (run.json is written): `resume` can continue it. A run cancelled
        before that (in the dashboard's local-only first pass) has nothing to continue."""
        return (self.path / "run.json").exists()

    @property
    def foreign(self) -> bool:
        """Running in another process (a CLI, another dashboard server, another machine)."""
        return self.status == "running" and (self.host != socket.gethostname() or self.pid != os.getpid())

    @property
    def stamp(self) -> str:
        """Changes whenever analysis.json is rewritten: the cache key of everything derived."""
        return file_stamp(self.path / "analysis.json")

    @property
    def key(self) -> str:
        return f"{self.id}@{self.stamp}"

    @property
    def when(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created))

    def formats_summary(self) -> str:
        weights = ",".join(self.config.get("weight_formats") or ()) or "—"
        acts = ",".join(self.config.get("act_formats") or ()) or "none"
        samples = (self.config.get("quant") or self.config).get("num_samples")  # flat in runs of quantlens 0.1
        return f"W {weights} · A {acts}" + (f" · {samples} samples" if samples else "")

    def workers_summary(self) -> str:
        """Where the sweep ran: one process, or N workers and how the trials were split between them."""
        workers, ray_address = self.config.get("workers") or 1, self.config.get("ray_address")
        if workers == 1 and ray_address is None:
            return "1 process"
        split = "chunks of samples" if self.config.get("output_metrics") == "estimated" else "layers"
        where = f" on the Ray cluster at {ray_address}" if ray_address is not None else ""
        return f"{workers} workers{where}, split by {split}"

    def title(self) -> str:
        status = "" if self.done else f" · {self.status}"
        return f"{self.model} · {self.when}{status}"

    def get_inputs(self) -> Inputs | None:
        return inputs_from_dict(self.inputs)


# --- writing ---------------------------------------------------------------------------------------


def file_stamp(path: Path) -> str:
    """Size and modification time: changes when the file is rewritten (a cheap cache key)."""
    try:
        stat = path.stat()
    except OSError:
        return "missing"
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:32] or "run"


def write_json_atomic(path: Path, payload: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1, default=str)))


def read_meta(path: str | Path) -> dict[str, Any]:
    """The run's meta.json as a dict; {} when missing or unreadable (a FIFO or device in its place
    would hang the reader, a huge file exhaust it: both count as unreadable)."""
    file = Path(path) / RUN_META
    try:
        meta = json.loads(read_regular(file, "run record", MAX_META_BYTES))
    except (OSError, ValueError):  # missing, unreadable, not a regular file, too big, not JSON
        return {}
    return meta if isinstance(meta, dict) else {}


def write_meta(path: str | Path, **updates: Any) -> dict[str, Any]:
    """Merge `updates` into the run's meta.json (created if missing); returns the new record."""
    path = Path(path)
    meta = {**read_meta(path), **updates, "schema": META_SCHEMA}
    write_json_atomic(path / RUN_META, meta)
    return meta


def mark_running(path: str | Path, **updates: Any) -> dict[str, Any]:
    """Status running, owned by this process (so others can tell a live run from an interrupted one)."""
    return write_meta(path, status="running", error=None, pid=os.getpid(), host=socket.gethostname(), **updates)


def new_run_dir(store: str | Path, label: str) -> tuple[str, Path]:
    """A fresh, empty run folder in `store`: (run id, path). Ids sort by creation time."""
    root = Path(store).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(label)}-{uuid.uuid4().hex[:4]}"
    path = root / run_id
    path.mkdir()
    return run_id, path


def create_run(store: str | Path, inputs: Inputs, config: dict[str, Any]) -> tuple[str, Path]:
    """A new run folder whose meta.json says running, by this process, on these inputs."""
    label = inputs.label or inputs.model_spec
    run_id, path = new_run_dir(store, label)
    mark_running(path, id=run_id, created=time.time(), model=label, data=inputs.data_label or inputs.data_spec,
                 inputs=asdict(inputs), config=config)
    return run_id, path


# --- reading -----------------------------------------------------------------------------------------


def _owner_alive(meta: dict[str, Any], own_jobs: Collection[str] | None, run_id: str) -> bool:
    """Whether the process recorded as running this run is still at it."""
    pid, host = meta.get("pid"), meta.get("host")
    if not isinstance(pid, int) or not host:
        return False  # written before owners were recorded: that server is long gone
    if host != socket.gethostname():
        return True  # another machine's run (a shared store): we cannot look, so we must not touch it
    if pid == os.getpid():
        # This process: the pid says nothing, a job thread may have died; the caller knows its jobs.
        return own_jobs is None or run_id in own_jobs
    if os.name != "posix":
        return False  # no cheap liveness test (os.kill(pid, 0) would end the process on Windows)
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return False
    return True


def read_run(path: str | Path, own_jobs: Collection[str] | None = None) -> RunInfo | None:
    """The run in `path` (a store entry or a `quantlens analyze --out` folder); None if it is not a run.

    `own_jobs`: ids of the runs this process is analysing now; a run recorded as this process's but
    not among them was interrupted. Without it, this process counts as running everything it owns."""
    path = Path(path)
    if not path.is_dir():
        return None
    meta = read_meta(path)
    has_analysis = (path / "analysis.json").exists()
    has_header = (path / "run.json").exists()
    if not meta and not has_analysis and not has_header:
        return None  # not a run folder
    status = meta.get("status") if meta.get("status") in STATUSES else ("done" if has_analysis else "interrupted")
    if status == "running" and not _owner_alive(meta, own_jobs, path.name):
        status = "interrupted"
    if status == "done" and not has_analysis:
        status = "interrupted"
    config = meta.get("config") or {}
    if not config and has_header:  # a folder written by `quantlens analyze --out` before meta.json
        try:
            config = json.loads(read_regular(path / "run.json", "run header", 16 << 20)).get("config", {})
        except (OSError, ValueError, AttributeError):
            config = {}
    try:
        created = float(meta.get("created") or (path / "run.json" if has_header else path).stat().st_mtime)
    except (OSError, TypeError, ValueError):
        return None
    pid = meta.get("pid")
    return RunInfo(
        id=path.name, path=path, status=status, model=str(meta.get("model") or path.name),
        data=str(meta.get("data") or ""), created=created, seconds=meta.get("seconds"),
        error=meta.get("error"), inputs=meta.get("inputs"), config=config if isinstance(config, dict) else {},
        layers=meta.get("layers"), trials=meta.get("trials"),
        pid=pid if isinstance(pid, int) else None, host=meta.get("host"),
    )


def list_runs(store: str | Path, own_jobs: Collection[str] | None = None) -> list[RunInfo]:
    """Every run folder in `store`, newest first (a few small JSON reads per run: cheap)."""
    root = Path(store).expanduser()
    if not root.is_dir():
        return []
    runs = []
    for child in root.iterdir():
        if child.is_dir() and not child.name.startswith("."):
            info = read_run(child, own_jobs)
            if info is not None:
                runs.append(info)
    return sorted(runs, key=lambda r: (r.created, r.id), reverse=True)


def _entry(store: str | Path, run_id: str) -> Path | None:
    """The folder of `run_id` directly inside `store`; None for anything else (e.g. '../x')."""
    root = Path(store).expanduser().resolve()
    path = (root / run_id).resolve()
    return path if path.parent == root and path.is_dir() else None


def get_run(store: str | Path, run_id: str | None, own_jobs: Collection[str] | None = None) -> RunInfo | None:
    path = _entry(store, run_id) if run_id else None
    return read_run(path, own_jobs) if path is not None else None


def delete_run(store: str | Path, run_id: str, own_jobs: Collection[str] | None = None) -> None:
    """Remove a run folder from the store; refuses a run that is still being analysed."""
    path = _entry(store, run_id)
    info = read_run(path, own_jobs) if path is not None else None
    if info is None:
        raise ValueError(f"no run {run_id!r} in {Path(store).expanduser()}; pick one from the run list")
    if info.status == "running":
        where = f" (process {info.pid} on {info.host})" if info.foreign else ""
        raise ValueError(f"run {run_id} is still being analysed{where}; cancel it first")
    shutil.rmtree(path)


def run_labels(runs: list[RunInfo], detailed: bool = False) -> dict[str, str]:
    """Unique display labels per run id (two runs of one model in the same minute get their id's tail)."""
    labels = {r.id: r.title() + (f" · {r.formats_summary()}" if detailed else "") for r in runs}
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return {i: (label if counts[label] == 1 else f"{label} · {i.rsplit('-', 1)[-1]}") for i, label in labels.items()}
