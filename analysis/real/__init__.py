"""Run a precision map on real low-precision CPU kernels (torchao) and measure what it delivers.

The simulated path (analysis.evaluate) fake-quantizes; this one swaps each `nn.Linear` weight for a
torchao quantized tensor and runs torchao's kernels, so the figures are what a deployment gets:
actual bytes of the quantized tensors, measured latency, and how far the real output is from the
simulated one. Convolutions, embeddings, attention's packed projections, tied weights, float
formats and int16 stay in float with the reason given.

Two parts, the second built on the first:
    plan     format → torchao config per layer (`torchao_configs`, `torchao_config_dict`), and
             `apply_real`, the quantized copy; what runs on CPU and why is documented there
    measure  `evaluate_real` (metric, error, bytes, latency vs FP32 and vs the simulation) and
             `probe_cpu_support`
torchao itself is imported only when a plan is built or a model runs: it takes seconds.
"""

from analysis.real.measure import evaluate_real, probe_cpu_support, weight_storage_bytes
from analysis.real.plan import RealPlan, analysed_layers, apply_real, torchao_config_dict, torchao_configs

__all__ = [
    "torchao_configs", "torchao_config_dict", "apply_real", "evaluate_real", "probe_cpu_support",
    "weight_storage_bytes", "RealPlan", "analysed_layers",
]
