"""The cumulative view: every analysed layer quantized at once in one uniform configuration per
(target, format), each layer's local error with quantized inputs and the model output's error."""

from __future__ import annotations

import torch

from analysis.config import AnalysisConfig
from analysis.graph import load_args
from analysis.layers import Layer
from analysis.metrics import ErrorAccumulator
from analysis.quantsim import QuantSim
from analysis.results import TARGETS, CumulativeResult
from analysis.trials import one_line, plan_trials

__all__ = ["cumulative_view"]


def cumulative_view(sim: QuantSim, layers: list[Layer], config: AnalysisConfig) -> list[CumulativeResult]:
    """Every analysed layer quantized at once, per uniform configuration. A configuration that
    fails is kept as a record with its error (never dropped in silence)."""
    configs = {(t.target, t.weight_format, t.act_format) for t in plan_trials(layers, config)}
    results = []
    for target, wf, af in sorted(configs, key=lambda c: (TARGETS.index(c[0]), str(c[1]), str(c[2]))):
        assignment = {
            layer.name: (wf, af if layer.quantizable_input else None) for layer in layers
            if wf is not None or layer.quantizable_input
        }
        per_layer = {name: ErrorAccumulator() for name in assignment}
        output = ErrorAccumulator(sim.data.logits)
        failure = None
        try:
            overrides = sim.overrides(assignment)
            nodes = [n for n in sim.prepared.nodes if n.op != "placeholder"]
            for chunk in sim.chunks():
                cache = sim.cache(chunk)
                env = sim.rerun(cache, nodes, overrides)
                output.update(sim.output_of(cache), sim.output_of(env), sim.output_mask(chunk))
                with torch.inference_mode():
                    for name, (lwf, laf) in assignment.items():
                        for site in sim.sites(name):
                            fp_args, fp_kwargs = load_args(site.node, cache)
                            q_args, q_kwargs = load_args(site.node, env, cache)
                            reference = site.local(sim.gm, fp_args, fp_kwargs, None, None, cache[site.node])
                            quantized = site.local(sim.gm, q_args, q_kwargs, sim.quantized_weight(name, lwf),
                                                   sim.activation_quantizer(site, laf), env[site.node])
                            per_layer[name].update(reference, quantized)
            per_layer_stats, output_stats = {name: acc.result() for name, acc in per_layer.items()}, output.result()
        except Exception as exc:  # noqa: BLE001
            failure = one_line(exc)
            per_layer_stats, output_stats = {}, None
        results.append(CumulativeResult(
            target, wf.name_for("weight") if wf else None, af.name_for("activation") if af else None,
            per_layer_stats, output_stats, error=failure,
        ))
    return results
