"""Estimated output noise: each trial's local error carried to the model output to first order.

Quantizing one layer perturbs its output by δ (the local error the sweep measures anyway). To first
order the model output moves by J·δ, where J is the Jacobian of the output with respect to that
layer's output, so the output noise of one sample is ‖J·δ‖². We never form J: for any random vector
r with E[r·rᵀ] = I (Rademacher ±1 entries), E[(rᵀ·J·δ)²] = ‖J·δ‖², and rᵀ·J is one backward pass of
rᵀ·f(x) — for every layer at once. So a sweep costs one forward with autograd plus K backward passes
per chunk of samples, and per trial only the local replay that gives δ and a dot product, instead of
re-running the rest of the model. When the output has at most K values per sample (a classifier's
logits), the K vectors are the basis vectors instead, and Σ_c (e_cᵀ·J·δ)² = ‖J·δ‖² exactly (to first
order; no sampling noise at all).

Why this estimator and not the diagonal one of gradient-sensitivity tools (Σ_k g_k²·δ_k² with g the
gradient of the loss): the diagonal form drops every cross term between elements of δ, and weight
quantization errors are strongly correlated across positions (the same weight error multiplies every
pixel or token). The projection estimate keeps them; benchmarks/bench_estimate.py measures both.
Where the model is linear after the layer (the classifier head) the estimate is exact.

What is *not* estimated: cosine and max |error| of the output (NaN, never invented), KL and top-1
(None). `--verify K` re-measures the most sensitive trials exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from analysis.config import DEFAULT_PROJECTIONS
from analysis.graph import bind_inputs, load_args, primary_output, run_node
from analysis.metrics import ErrorStats, float64_home, sqnr_from_sums
from analysis.quantsim import QuantSim


def _float_leaves(value: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(value)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def rademacher(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Independent ±1 entries (float32, on the CPU), each sign one bit of a random byte: a language
    model's projection vector has millions of entries, and one random draw per byte instead of per
    entry makes drawing it ~5× cheaper (`torch.randint(0, 2, …)` costs as much as a layer's replay)."""
    n = 1
    for size in shape:
        n *= size
    random_bytes = torch.randint(0, 256, ((n + 7) // 8,), generator=generator, dtype=torch.uint8)
    bits = (random_bytes[:, None] >> _BIT_SHIFTS) & 1
    return bits.reshape(-1)[:n].reshape(shape).float().mul_(2).sub_(1)


def _per_sample(t: torch.Tensor, samples: int) -> torch.Tensor:
    """[samples, rest]: values of one sample in one row (sample-major layouts, as the sweep assumes);
    [1, all] for a value that is not one row per sample, which `NoiseEstimate` leaves out."""
    return t.reshape(samples, -1) if t.numel() % samples == 0 else t.reshape(1, -1)


@dataclass
class OutputGradients:
    """For one chunk: rᵀ·J at every node that a trial perturbs, for each of K vectors r."""

    samples: int
    exact: bool  # basis vectors (no sampling noise) rather than random projections
    grads: dict[Any, list[torch.Tensor]]  # node -> per float leaf of its value: [K, samples, rest]
    signal: float  # Σ FP32 output², for SQNR
    count: int  # output elements
    values: dict | None = None  # every node's FP32 value (detached) when asked for: the chunk's cache

    @property
    def projections(self) -> int:
        first = next(iter(self.grads.values()), None)
        return first[0].shape[0] if first else 0


def output_gradients(sim: QuantSim, chunk: tuple[int, int], nodes: list, projections: int = DEFAULT_PROJECTIONS,
                     seed: int = 0, keep_values: bool = False) -> OutputGradients:
    """One forward with autograd over the chunk, then K backward passes (see the module docstring).

    keep_values: also return every node's value, detached — the same numbers `QuantSim.cache` would
    compute for the chunk (the forward is the same), so the sweep need not run the chunk twice.

    The graph runs on the simulator's private prepared copy; the caller's parameters are read, never
    given gradients (`torch.autograd.grad` returns them instead of accumulating into `.grad`)."""
    prepared = sim.prepared
    gm = prepared.graph_module
    inputs = sim.data.inputs[chunk[0]:chunk[1]].to(sim.device)
    samples = chunk[1] - chunk[0]
    wanted = set(nodes)
    env: dict = bind_inputs(prepared, inputs)
    leaves: dict[Any, list[torch.Tensor]] = {}
    with torch.enable_grad():
        for node in prepared.nodes:
            if node.op == "placeholder":
                continue
            args, kwargs = load_args(node, env)
            value = run_node(gm, node, args, kwargs)
            if node in wanted:
                # autograd.grad reports rᵀ·J at any tensor of the graph; a value that does not
                # require grad yet (frozen weights, integer inputs upstream) becomes a leaf that does.
                value = torch.utils._pytree.tree_map(
                    lambda t: t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                    and not t.requires_grad else t, value)
                leaves[node] = _float_leaves(value)
            env[node] = value
        output = primary_output(env[prepared.output_node])
    values = {node: torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, value)
              for node, value in env.items()} if keep_values else None
    del env
    flat = output.detach().reshape(samples, -1)
    width = flat.shape[1]
    # Positions that do not count (language-model padding) get no projection weight: their error is
    # neither estimated nor part of the signal, as in the exact metrics.
    mask = sim.output_mask(chunk)
    keep = None
    if mask is not None:
        keep = mask.reshape(*mask.shape, *([1] * (output.dim() - mask.dim()))).expand_as(output)
        keep = keep.reshape(samples, -1).to(flat.dtype)
    exact = width <= projections
    count = projections if not exact else width
    generator = torch.Generator(device="cpu").manual_seed(seed + chunk[0])
    grads: dict[Any, list[torch.Tensor]] = {
        node: [torch.empty((count, *_per_sample(t, samples).shape), dtype=torch.float32, device=t.device) for t in ts]
        for node, ts in leaves.items()}
    order = [(node, i, t) for node, ts in leaves.items() for i, t in enumerate(ts)]
    for k in range(count):
        if exact:
            vector = torch.zeros_like(flat)
            vector[:, k] = 1.0
        else:
            vector = rademacher(tuple(flat.shape), generator).to(flat.dtype).to(flat.device)
        if keep is not None:
            vector = vector * keep
        got = torch.autograd.grad(output.reshape(samples, -1), [t for _, _, t in order], grad_outputs=vector,
                                  retain_graph=k < count - 1, allow_unused=True)
        for (node, i, _), g in zip(order, got):
            if g is not None:
                grads[node][i][k] = _per_sample(g.detach().float(), samples)
            else:  # the output does not depend on this value: its rᵀ·J is zero
                grads[node][i][k].zero_()
    home = float64_home(flat.device)
    counted = flat if keep is None else flat * keep
    signal = float(counted.to(home).double().pow(2).sum())
    elements = flat.numel() if keep is None else int(keep.sum())
    return OutputGradients(samples, exact, grads, signal, elements, values)


def node_difference(quantized: Any, reference: Any) -> Any:
    """quantized − reference for every floating tensor of a node value (tuples of outputs too)."""
    return torch.utils._pytree.tree_map(
        lambda q, r: q - r if isinstance(q, torch.Tensor) and q.is_floating_point() else q, quantized, reference)


class NoiseEstimate:
    """Running sum of one trial's estimated output noise over chunks.

    diagonal=True gives the gradient-only variant Σ_k g_k²·δ_k² instead (cross terms between error
    elements dropped), kept for comparison in benchmarks/bench_estimate.py."""

    def __init__(self, diagonal: bool = False) -> None:
        self.diagonal = diagonal
        self.signal = 0.0
        self.count = 0
        self._pending: list[torch.Tensor] = []

    def update(self, grads: OutputGradients, deltas: dict[Any, Any]) -> None:
        """deltas: node -> (quantized − FP32) value of that node (same structure as the node's value)."""
        dots = None
        for node, delta in deltas.items():
            for g, d in zip(grads.grads[node], _float_leaves(delta)):
                d = _per_sample(d.detach().float(), grads.samples)
                if d.shape[0] != grads.samples:  # not one row per sample: no per-sample dot to take
                    continue
                if self.diagonal:
                    term = torch.einsum("ksn,sn->k", g.pow(2), d.pow(2)).reshape(-1, 1)
                else:
                    # rᵀ·J·δ per vector and sample; vecdot rather than einsum("ksn,sn->ks"), which
                    # runs as a strided batched matrix-vector product, ~8× slower on CPU at these sizes.
                    term = torch.linalg.vecdot(g, d)
                dots = term if dots is None else dots + term
        if dots is not None:
            noise = dots.double().sum() if self.diagonal else dots.double().pow(2).sum()
            self._pending.append(noise / (1 if grads.exact else grads.projections))
        self.signal += grads.signal
        self.count += grads.count

    def state(self) -> dict[str, Any]:
        """Plain numbers (JSON-ready, exact through `json`) from which `from_state` rebuilds this
        estimate: the per-chunk noise terms are kept one by one, so a rebuilt estimate sums them in
        the same order and its result is the same to the last bit."""
        return {"diagonal": self.diagonal, "signal": self.signal, "count": self.count,
                "pending": [float(term) for term in self._pending]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> NoiseEstimate:
        """The estimate `state()` described (its terms on the CPU)."""
        if not isinstance(state, dict) or set(state) != {"diagonal", "signal", "count", "pending"}:
            raise ValueError("not a NoiseEstimate state; expected the keys diagonal, signal, count, pending "
                             "as written by NoiseEstimate.state()")
        if not isinstance(state["diagonal"], bool):
            raise ValueError(f"NoiseEstimate state: diagonal must be true or false, not {state['diagonal']!r}")
        if isinstance(state["count"], bool) or not isinstance(state["count"], int) or state["count"] < 0:
            raise ValueError(f"NoiseEstimate state: count must be a non-negative integer, not {state['count']!r}")
        terms = state["pending"]
        if not isinstance(terms, list) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                              for v in [state["signal"], *terms]):
            raise ValueError("NoiseEstimate state: signal must be a number and pending a list of numbers")
        estimate = cls(diagonal=state["diagonal"])
        estimate.signal, estimate.count = float(state["signal"]), state["count"]
        estimate._pending = [torch.tensor(float(v), dtype=torch.float64) for v in terms]
        return estimate

    def merge(self, other: "NoiseEstimate") -> None:
        """Add `other`'s chunks after this one's (in place). Merging one-chunk estimates in chunk
        order gives, bit for bit, what one estimate updated with those chunks in that order holds:
        the per-chunk noises are kept as they are and the signal is summed in the same order."""
        if not isinstance(other, NoiseEstimate) or other.diagonal != self.diagonal:
            raise ValueError("can only merge a NoiseEstimate of the same kind (diagonal or not)")
        self._pending.extend(other._pending)
        self.signal += other.signal
        self.count += other.count

    def result(self) -> ErrorStats:
        # Terms rebuilt by from_state live on the CPU, later ones on the data's device.
        home = self._pending[-1].device if self._pending else None
        noise = float(torch.stack([term.to(home) for term in self._pending]).sum()) if self._pending else 0.0
        nan = float("nan")
        return ErrorStats(sqnr_db=sqnr_from_sums(self.signal, noise), mse=noise / max(self.count, 1),
                          cosine=nan, max_abs_error=nan, count=self.count)
