"""Where a result came from — model spec, weights file and its content hash, data spec, fingerprints —
and the checks every consumer runs before it reuses that result.

A run records its provenance with absolute paths, so `suggest` from another directory reloads the
same files. Every consumer (`suggest`, `evaluate`, `export`, `finetune`, `remedies`, `--real`, the
dashboard) reloads exactly that model, or refuses with one line naming what differs and the flag
that fixes it: measuring an untrained model and writing its accuracy into a map is the failure
this module exists to prevent.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from analysis.loading.libraries import is_library_spec


class ProvenanceError(ValueError):
    """A result is about to be reused with a model, weights or data other than its own."""


@dataclass(frozen=True)
class Provenance:
    model_spec: str | None = None  # "sample:cnn", "/abs/net.py:build", "/abs/model.pt2"
    weights: str | None = None  # absolute path of the weights file, if any
    weights_sha256: str | None = None
    data_spec: str | None = None
    model_fingerprint: str | None = None  # of the loaded model's state dict (analysis.loading)
    data_fingerprint: str | None = None
    # The engine that ran the analysis ("graph" or "hooks"): evaluating, exporting or measuring its
    # maps uses it again, so a model only the hook engine runs is not traced by a later command.
    engine: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def of_result(cls, result: Any) -> "Provenance":
        """What an AnalysisResult records about its inputs. Runs of quantlens 0.1 only have
        "spec"/"fingerprint" in `result.model` and "spec" in `result.data`; those fill the gaps."""
        recorded = cls.from_dict(result.model)
        return cls(
            model_spec=recorded.model_spec or result.model.get("spec"), weights=recorded.weights,
            weights_sha256=recorded.weights_sha256, data_spec=recorded.data_spec or result.data.get("spec"),
            model_fingerprint=recorded.model_fingerprint or result.model.get("fingerprint"),
            data_fingerprint=recorded.data_fingerprint or result.data.get("fingerprint"),
            engine=recorded.engine or engine_of_source(result.model.get("source")),
        )

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any] | None) -> "Provenance":
        payload = payload or {}
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in payload.items() if k in names and (v is None or isinstance(v, str))})


def engine_of_source(source: str | None) -> str | None:
    """The engine a prepared model's source implies ("hooks" for the hook engine, "graph" for an fx
    or exported graph), for results written before the engine was recorded; None when unknown."""
    if source is None:
        return None
    return "hooks" if source == "hooks" else "graph"


def engine_for(given: str | None, recorded: Provenance) -> str:
    """The engine a command uses: the one asked for (--engine), else the one the analysis used,
    else "auto" (the graph, and the hook engine when tracing fails)."""
    return given or recorded.engine or "auto"


def absolute_spec(spec: str | None) -> str | None:
    """A model or data spec with its file part made absolute ("sample:..." and library models such as
    "torchvision:resnet18" unchanged)."""
    if spec is None:
        return None
    spec = str(spec).strip()
    if not spec or spec.startswith("sample:") or is_library_spec(spec):
        return spec
    path_part, sep, attr = spec.rpartition(":")
    if sep and path_part and Path(path_part).suffix == ".py" and attr.isidentifier():
        return f"{Path(path_part).expanduser().resolve()}:{attr}"
    return str(Path(spec).expanduser().resolve())


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def record(model_spec: str | None, weights: str | None, data_spec: str | None, *,
           model_fingerprint: str | None = None, data_fingerprint: str | None = None) -> Provenance:
    weights_path = str(Path(weights).expanduser().resolve()) if weights else None
    return Provenance(
        model_spec=absolute_spec(model_spec), weights=weights_path,
        weights_sha256=file_sha256(weights_path) if weights_path and Path(weights_path).is_file() else None,
        data_spec=absolute_spec(data_spec), model_fingerprint=model_fingerprint, data_fingerprint=data_fingerprint,
    )


def weights_to_load(recorded: Provenance, given: str | None, what: str) -> str | None:
    """The weights file a consumer should load: the recorded one unless the user named one; refuse
    when the recorded file changed or vanished (the result would describe other weights)."""
    if given is not None:
        return given
    if recorded.weights is None:
        return None
    path = Path(recorded.weights)
    if not path.is_file():
        raise ProvenanceError(f"{what} was made with weights {path}, which no longer exists; "
                              "pass --weights with the same file")
    if recorded.weights_sha256 and file_sha256(path) != recorded.weights_sha256:
        raise ProvenanceError(f"the weights file {path} changed since {what} was made (sha256 differs); "
                              "re-run `quantlens analyze`, or pass --weights with the original file")
    return str(path)


def check_model(recorded_fingerprint: str | None, model: Any, what: str, fix: str = "re-run `quantlens analyze`") -> str:
    """Refuse a model whose weights differ from the ones `what` was made for; returns its fingerprint."""
    from analysis.loading import model_fingerprint

    actual = model_fingerprint(model)
    if recorded_fingerprint and actual != recorded_fingerprint:
        raise ProvenanceError(f"{what} was made for model {recorded_fingerprint}, but the model loaded is {actual} "
                              f"(other weights?); {fix}")
    return actual
