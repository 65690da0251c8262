"""KV-cache bytes and FLOPs per token of an AHN model against the same model with full attention.

Cache bytes are measured, not computed: an ``AHNCache`` of the model's shapes
is allocated on the ``meta`` device (no memory) and its buffers' ``nbytes``
are summed. FLOPs count the math of each token (2 per multiply-add) in its
recurrent form: projections, MLP, lm_head, attention over the keys the token
sees, and for AHN the memory's gates, state update, readout and output
projection. The chunked algorithms do a little more work than that
(intra-chunk terms), and norms, RoPE and softmax are left out in both columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import AHNCache

RULES = {"dn": "delta", "gdn": "gated_delta", "mamba2": "ssd"}
# Memory FLOPs per head per token, in units of D² (recurrent form):
# delta: Sᵀk̂, the rank-1 correction, Sᵀq̂ (2 each); gated delta adds the decay (1); SSD: decay 1, write 2, read 2.
STATE_D2 = {"delta": 6, "gated_delta": 7, "ssd": 5}
# hidden -> per-head scalar projections: b, g (DN); a, b, g (GDN); dt, g (Mamba2).
GATE_PROJS = {"delta": 2, "gated_delta": 3, "ssd": 2}
# The paper's reported savings for Qwen2.5-3B at 128k (arXiv 2510.07318, abstract).
PAPER = {"cache": -74.0, "flops": -40.5}


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


# Qwen2.5 configs (config.json of the Hugging Face releases).
CONFIGS = {
    "qwen2.5-3b": ModelDims(2048, 36, 16, 2, 128, 11008, 151936),
    "qwen2.5-7b": ModelDims(3584, 28, 28, 4, 128, 18944, 152064),
    "qwen2.5-14b": ModelDims(5120, 48, 40, 8, 128, 13824, 152064),
}


def full_cache_bytes(m: ModelDims, context: int, dtype=torch.bfloat16) -> int:
    """K and V of every token of every layer: [layers, 2, context, HK, D]."""
    return m.layers * 2 * context * m.kv_heads * m.head_dim * dtype.itemsize


def ahn_cache_bytes(m: ModelDims, window: int, sinks: int, memory: str, dtype=torch.bfloat16) -> dict:
    """Per-component bytes of the model's AHN caches (all layers, batch 1), measured on the meta device."""
    c = AHNCache.empty(1, window, sinks, m.kv_heads, m.head_dim, m.heads, RULES[memory], dtype, "meta")
    parts = {"k, v (sinks + window)": c.k.nbytes + c.v.nbytes, "gates (fp32)": c.gates.nbytes,
             "state (fp32)": c.state.nbytes, "positions": c.positions.nbytes}
    return {name: m.layers * n for name, n in parts.items()}


def _dense(m: ModelDims) -> int:
    """The position-independent FLOPs of a token: q, k, v, o projections, MLP, lm_head."""
    HQ, HK, D, h = m.heads, m.kv_heads, m.head_dim, m.hidden
    return m.layers * 2 * (h * HQ * D + 2 * h * HK * D + HQ * D * h + 3 * h * m.intermediate) + 2 * h * m.vocab


def _per_key(m: ModelDims) -> int:
    """FLOPs per visible key: QKᵀ and PV over every layer."""
    return m.layers * 4 * m.heads * m.head_dim


def _memory(m: ModelDims, memory: str) -> int:
    """FLOPs of a token that reads a non-empty memory: gates, state update, readout, output projection."""
    rule = RULES[memory]
    return m.layers * (2 * GATE_PROJS[rule] * m.hidden * m.heads + (STATE_D2[rule] + 2) * m.heads * m.head_dim ** 2)


def flops_per_token(m: ModelDims, position: int, window: int | None = None, sinks: int = 0, memory: str = "gdn"):
    """FLOPs of the token at ``position`` (0-based); ``window=None`` is full attention."""
    if window is None:
        return _dense(m) + _per_key(m) * (position + 1)
    return (_dense(m) + _per_key(m) * min(position + 1, window + sinks)
            + (_memory(m, memory) if position - window >= sinks else 0))


def mean_flops(m: ModelDims, context: int, window: int | None = None, sinks: int = 0, memory: str = "gdn") -> float:
    """FLOPs per token averaged over a whole ``context``-token sequence (the per-token sum in closed form)."""
    if window is None:
        return _dense(m) + _per_key(m) * (context + 1) / 2
    keys = _window_keys(context, window + sinks)
    return _dense(m) + (_per_key(m) * keys + _memory(m, memory) * max(context - window - sinks, 0)) / context


def _window_keys(context: int, span: int) -> int:
    """Σ_t min(t + 1, span) over t < context."""
    n = min(context, span)
    return n * (n + 1) // 2 + (context - n) * span


def report(config: str, context: int, window: int, sinks: int, memory: str, dtype=torch.bfloat16) -> str:
    """The table ``python -m ahn_kernels accounting`` prints."""
    m = CONFIGS[config]
    full = full_cache_bytes(m, context, dtype)
    parts = ahn_cache_bytes(m, window, sinks, memory, dtype)
    ahn = sum(parts.values())
    pct = lambda new, old: 100.0 * (new - old) / old
    # The paper reports one model at one context; other rows have nothing to compare with.
    paper = {k: f"{v:+7.1f}%" for k, v in PAPER.items()} if (config, context) == ("qwen2.5-3b", 131072) \
        else {k: f"{'n/a':>8s}" for k in PAPER}
    lines = [f"{config} ({m.layers} layers, {m.heads}/{m.kv_heads} heads, head dim {m.head_dim}), "
             f"context {context}, AHN-{memory.upper()} window {window} + {sinks} sinks, batch 1, "
             f"{str(dtype).removeprefix('torch.')} K/V",
             "",
             f"{'KV cache':34s} {'full attention':>16s} {'AHN':>16s} {'change':>9s} {'paper':>8s}",
             f"{'  total':34s} {full / 2**20:13.1f} MiB {ahn / 2**20:13.1f} MiB {pct(ahn, full):+8.1f}% "
             f"{paper['cache']}"]
    lines += [f"{'    ' + name:34s} {'':16s} {n / 2**20:13.1f} MiB" for name, n in parts.items()]
    lines.append(f"{'  without the gate ring':34s} {full / 2**20:13.1f} MiB "
                 f"{(ahn - parts['gates (fp32)']) / 2**20:13.1f} MiB "
                 f"{pct(ahn - parts['gates (fp32)'], full):+8.1f}%")
    lines.append("")
    lines.append(f"{'FLOPs per token':34s} {'full attention':>16s} {'AHN':>16s} {'change':>9s} {'paper':>8s}")
    f_full, f_ahn = mean_flops(m, context), mean_flops(m, context, window, sinks, memory)
    lines.append(f"{'  mean over the context':34s} {f_full / 1e9:12.2f} GFLOP {f_ahn / 1e9:12.2f} GFLOP "
                 f"{pct(f_ahn, f_full):+8.1f}% {paper['flops']}")
    d_full, d_ahn = flops_per_token(m, context - 1), flops_per_token(m, context - 1, window, sinks, memory)
    lines.append(f"{'  the last token (decode)':34s} {d_full / 1e9:12.2f} GFLOP {d_ahn / 1e9:12.2f} GFLOP "
                 f"{pct(d_ahn, d_full):+8.1f}%")
    lines.append("")
    lines.append("paper: Qwen2.5-3B-Instruct + AHN at 128k context (arXiv 2510.07318); see README 'Models'.")
    return "\n".join(lines)
