"""Architectures of the bundled sample models.

Kept free of scikit-learn (and of any training code) so that loading a sample only needs torch.
Every forward is straight-line tensor code: torch.fx.symbolic_trace and torch.export must both
trace the eval-mode model without guards on data.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsMLP", "DigitsCNN", "TinyTransformerLM", "LLAMA_CONFIG", "build_llama"]


class DigitsMLP(nn.Module):
    """64 -> 128 -> 64 -> 10 classifier for flattened 8x8 digits scaled to [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(128, 64)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    # bias=False: the BatchNorm shift makes a conv bias redundant (and BN folding expects none).
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class DigitsCNN(nn.Module):
    """Depthwise-separable CNN with BatchNorm for [N, 1, 8, 8] digits scaled to [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(1, 16, 3)
        self.dw1 = _conv_bn_relu(16, 16, 3, groups=16)
        self.pw1 = _conv_bn_relu(16, 32, 1)
        self.dw2 = _conv_bn_relu(32, 32, 3, stride=2, groups=32)  # 8x8 -> 4x4
        self.pw2 = _conv_bn_relu(32, 64, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw2(self.dw2(self.pw1(self.dw1(self.stem(x)))))
        return self.fc(self.flatten(self.pool(x)))


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        # need_weights=False: the averaged attention map is never used and costs memory.
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


@torch.fx.wrap  # a leaf for symbolic_trace, whose Proxy lengths cannot slice a real buffer
def _trim(buffer: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``buffer`` cut to the sequence length of ``tokens`` in every dim ([T, T] mask, [T] positions)."""
    t = tokens.shape[1]
    return buffer[(slice(0, t),) * buffer.dim()]


class TinyTransformerLM(nn.Module):
    """Causal byte-level language model: int64 tokens [N, T<=64] -> logits [N, T, 256].

    ``lm_head.weight`` is tied to ``tok_emb.weight`` (one Parameter, two names).
    """

    def __init__(
        self, vocab: int = 256, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
        d_ff: int = 256, max_len: int = 64,
    ) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        # nn.Embedding's default N(0, 1) would, through the tied head, start with logits of std ~8.
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        # Precomputed so forward only slices it: no Python branch on the sequence length, and not
        # persistent because it is a constant, not a weight to ship.
        mask = torch.triu(torch.full((max_len, max_len), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)
        # Not persistent either: positions are derived from the input length.
        self.register_buffer("positions", torch.arange(max_len), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = _trim(self.causal_mask, tokens)
        x = self.tok_emb(tokens) + self.pos_emb(_trim(self.positions, tokens))
        for block in self.blocks:  # fixed module list: unrolled at trace time
            x = block(x, mask)
        return self.lm_head(self.ln_f(x))


# A Llama-architecture causal LM as Hugging Face writes it (RMSNorm, rotary positions, grouped-query
# attention, gated SiLU MLP, tied embeddings), small enough to train on a laptop CPU in minutes. It
# ships as a Hugging Face directory (config.json + model.safetensors + tokenizer), the form users
# bring, and needs transformers (quantlens[hf]) to load.
LLAMA_CONFIG = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}


def import_transformers():
    """transformers, imported after the torchvision guard (it imports torchvision when installed, and
    PyPI's torchvision wheel may be built for another torch: see analysis.compat)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        from analysis.compat import import_torchvision

        import_torchvision()
    import transformers

    return transformers


def build_llama() -> nn.Module:
    """A fresh, randomly initialised LlamaForCausalLM of `LLAMA_CONFIG`."""
    transformers = import_transformers()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_CONFIG))
