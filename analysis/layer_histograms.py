"""The histograms a sweep reports per layer: its weight in FP32 and in each weight format (with the
format's clipping range), its per-channel weight ranges, and its input as calibration saw it, with
where each activation format clips and moves it."""

from __future__ import annotations

import numpy as np
import torch

from analysis.config import AnalysisConfig
from analysis.layers import Layer
from analysis.quantsim import QuantSim
from analysis.results import Histogram, LayerHistograms, TensorHistograms

__all__ = ["layer_histograms"]


def layer_histograms(sim: QuantSim, layers: list[Layer], config: AnalysisConfig) -> dict[str, LayerHistograms]:
    """Each layer's weight histogram (FP32 and every weight format of `config`, with its clipping
    range), per-channel weight ranges, and its input histogram from the simulator's calibration."""
    bins = config.histogram_bins
    out = {}
    for layer in layers:
        w = sim.table.weight(layer.name).detach().float()
        lo, hi = float(w.min()), float(w.max())
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        fp32 = np.histogram(w.cpu().numpy(), bins=edges)[0]
        quantized, clip = {}, {}
        for wf in config.parsed_weight_formats():
            wq = sim.quantized_weight(layer.name, wf)
            wlo, whi = sim.weight_range(layer.name, wf)
            name = wf.name_for("weight")
            quantized[name] = tuple(np.histogram(np.clip(wq.float().cpu().numpy(), lo, hi), bins=edges)[0].astype(float))
            clip[name] = (float(wlo.min()), float(whi.max()))
        rows = w.movedim(layer.channel_axis, 0).reshape(w.shape[layer.channel_axis], -1) if w.dim() > 1 else w.reshape(1, -1)
        out[layer.name] = LayerHistograms(
            weight=TensorHistograms(Histogram(tuple(edges), tuple(fp32.astype(float))), quantized, clip),
            activation=_activation_histogram(sim, layer, bins, config),
            channel_min=tuple(rows.amin(dim=1).tolist()),
            channel_max=tuple(rows.amax(dim=1).tolist()),
        )
    return out

def _activation_histogram(sim: QuantSim, layer: Layer, bins: int, config: AnalysisConfig) -> TensorHistograms | None:
    site = sim.sites(layer.name)[0]
    hist = sim.activation_histogram(site, 0)
    if hist is None or not layer.quantizable_input:
        return None
    fine_edges, fine_counts = np.asarray(hist.edges), np.asarray(hist.counts)
    edges = np.linspace(fine_edges[0], fine_edges[-1], bins + 1)
    centers = torch.tensor((fine_edges[:-1] + fine_edges[1:]) / 2, dtype=torch.float32, device=sim.device)
    fp32 = np.histogram(centers.cpu().numpy(), bins=edges, weights=fine_counts)[0]
    quantized, clip = {}, {}
    for af in config.parsed_act_formats():
        if af.block_scaled:  # a value's scale depends on its block's neighbours: bin centres cannot stand in
            continue
        name = af.name_for("activation")
        # Moving each fine bin's count to where its centre quantizes to: exact up to 1/2048 of the range.
        q_centers = sim.activation_quantizer(site, af)(0, centers).cpu().numpy()
        quantized[name] = tuple(np.histogram(np.clip(q_centers, edges[0], edges[-1]), bins=edges, weights=fine_counts)[0])
        if af.scaled and not sim.config.dynamic_activations:
            lo, hi = sim.activation_range(site, 0, af)
            clip[name] = (float(lo), float(hi))
        else:
            clip[name] = (float(fine_edges[0]), float(fine_edges[-1]))
    return TensorHistograms(Histogram(tuple(edges), tuple(fp32.astype(float))), quantized, clip)
