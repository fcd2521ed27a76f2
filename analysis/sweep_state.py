"""Where a single-process sweep stands, as plain data a resumed run continues from (`SweepState`),
and when the sweep hands it out (`Checkpoints`). Where a state is kept is `analysis.runs`' business."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from analysis.trials import Trial, TrialKey

__all__ = ["PHASES", "Checkpoints", "SweepState", "checkpoint_interval"]

PHASES = ("sweep", "verify")  # the pass over every trial, then --verify's exact re-measurement


@dataclass(frozen=True)
class SweepState:
    """Where a single-process sweep stands: `Sweep.run` reports one to its `checkpoint` callback
    after every chunk of samples but the last of a pass, and within a chunk after a trial (at most
    every `checkpoint_every` seconds), and continues from one given as `start`. Plain data
    (`to_dict` is JSON-ready and exact through `json`); where it is kept is the caller's business
    (`analysis.runs` keeps it in the run folder).

    phase: "sweep" (every unfinished trial) or "verify" (`--verify`'s exact re-measurement);
    chunks: the chunk boundaries it was taken with; done: chunks of that phase completed;
    trials: each unfinished trial's running sums; verified: the trials the verify phase re-measures;
    ahead: the trials whose sums already hold chunk `done` too (a state taken within that chunk),
    which a continued sweep does not run on it again."""

    phase: str
    chunks: tuple[tuple[int, int], ...]
    done: int
    trials: dict[TrialKey, dict[str, Any]]
    verified: tuple[TrialKey, ...] = ()
    ahead: tuple[TrialKey, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "chunks": [list(c) for c in self.chunks], "done": self.done,
                "trials": [[list(key), state] for key, state in self.trials.items()],
                "verified": [list(key) for key in self.verified], "ahead": [list(key) for key in self.ahead]}

    @classmethod
    def from_dict(cls, payload: Any) -> SweepState:
        """The state `to_dict` wrote (one without `ahead`, as written before states were taken within
        a chunk, has none); ValueError (one line) for anything else. The trials' sums are checked
        when a sweep restores them (`Sweep.restore`), which knows their mode."""
        keys = {"phase", "chunks", "done", "trials", "verified"}
        if not isinstance(payload, dict) or set(payload) not in (keys, keys | {"ahead"}):
            raise ValueError("not a sweep state: expected the keys phase, chunks, done, trials, verified, ahead")
        if payload["phase"] not in PHASES:
            raise ValueError(f"sweep state: phase must be one of {', '.join(PHASES)}, not {payload['phase']!r}")
        chunks, done = payload["chunks"], payload["done"]
        if not isinstance(chunks, list) or not all(_ints(c, 2) for c in chunks):
            raise ValueError("sweep state: chunks must be a list of [start, end] sample indices")
        if not _ints([done], 1):
            raise ValueError(f"sweep state: done must be a count of chunks, not {done!r}")
        trials, verified = payload["trials"], payload["verified"]
        if not isinstance(trials, list) or not all(isinstance(t, list) and len(t) == 2 and _key(t[0])
                                                   and isinstance(t[1], dict) for t in trials):
            raise ValueError("sweep state: trials must be a list of [[layer, target, format], sums]")
        ahead = payload.get("ahead", [])
        for name, value in (("verified", verified), ("ahead", ahead)):
            if not isinstance(value, list) or not all(_key(k) for k in value):
                raise ValueError(f"sweep state: {name} must be a list of [layer, target, format]")
        return cls(payload["phase"], tuple((a, b) for a, b in chunks), done,
                   {tuple(key): state for key, state in trials}, tuple(tuple(k) for k in verified),
                   tuple(tuple(k) for k in ahead))


def _ints(values: Any, length: int) -> bool:
    return (isinstance(values, list) and len(values) == length
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values))


def _key(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)


def checkpoint_interval(seconds: Any) -> float:
    """`seconds` as the least time between two checkpoints within a chunk (`Sweep.run`'s
    `checkpoint_every`); ValueError (one line) unless it is a number ≥ 0."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise ValueError(f"checkpoint_every must be a number of seconds >= 0 (0: after every trial), not {seconds!r}")
    return float(seconds)


class Checkpoints:
    """When `Sweep.run` hands its state to its `checkpoint` callback: at the end of a chunk
    (`report`), and within one after a trial once `every` seconds have passed since it last did
    (`within`), so a kill loses the trials of those seconds while big runs are not rewritten after
    every trial."""

    def __init__(self, callback: Callable[[SweepState], None] | None, every: float) -> None:
        self.callback, self.every = callback, checkpoint_interval(every)
        self.last = time.monotonic()

    def report(self, state: Callable[[], SweepState]) -> None:
        if self.callback is not None:
            self.callback(state())
            self.last = time.monotonic()

    def within(self, ran: list[TrialKey], total: int, state: Callable[[], SweepState]) -> Callable[[Trial], None]:
        """What to call after each trial of a chunk of `total` trials: it adds the trial to `ran` (the
        chunk's trials done) and, while some are left (a chunk's end is reported anyway), reports
        `state()` when due."""
        def after(trial: Trial) -> None:
            ran.append(trial.key)
            if len(ran) < total and self.callback is not None and time.monotonic() - self.last >= self.every:
                self.report(state)

        return after
