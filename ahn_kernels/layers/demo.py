"""``python -m ahn_kernels demo``: long generation with a tiny random Qwen2, AHN cache against full attention.

The model is built from a config in code (no download) with random weights;
both runs call ``model.generate`` unchanged (greedy), the AHN one through
``AHNModelCache``, the full-attention one through transformers' default
``DynamicCache``. A streamer records the time of every new token and the
cache's size, which the table (and ``--plot``) shows per context length.
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from .cache import AHNModelCache
from .hf import patch_model


def tiny_qwen2(max_positions: int) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2-shaped model: hidden 128, 4 query / 2 key-value heads of dim 32, vocab 512."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=max_positions, attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).eval()


class _Recorder:
    """A ``generate`` streamer: (seconds since start, cache bytes) at each new token."""

    def __init__(self, cache_bytes):
        self.cache_bytes, self.rows, self.start = cache_bytes, [], None

    def put(self, value):
        now = time.perf_counter()
        if self.start is None:  # generate first streams the prompt
            self.start = now
            return
        self.rows.append((now - self.start, self.cache_bytes()))

    def end(self):
        pass


def _dynamic_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


def _generate(model, cache, cache_bytes, prompt, new_tokens):
    rec = _Recorder(cache_bytes)
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, cache=cache, streamer=rec)
    return rec.rows


def run(tokens: int = 32768, window: int = 1024, sinks: int = 64, memory: str = "gdn", prompt: int = 256,
        rows: int = 8, full: bool = True, plot: str | None = None) -> str:
    """Generate up to ``tokens`` tokens of context with both models; return the printed table."""
    base = tiny_qwen2(tokens + 1)
    ahn = patch_model(copy.deepcopy(base), memory=memory, window_size=window, num_sinks=sinks)
    ids = torch.randint(0, base.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    new = tokens - prompt
    runs = {}
    threads = torch.get_num_threads()
    # Decoding a model this small is a chain of tiny ops: OpenMP's fork/join per op costs more than it
    # saves (measured on the 2-core CI machine under load: ~20 ms/token on one thread, ~400 on two).
    torch.set_num_threads(1)
    try:
        cache = AHNModelCache(ahn)
        runs["AHN"] = _generate(ahn, cache, cache.nbytes, ids, new)
        if full:
            dyn = DynamicCache(config=base.config)
            runs["full attention"] = _generate(base, dyn, lambda: _dynamic_bytes(dyn), ids, new)
    finally:
        torch.set_num_threads(threads)
    marks = sorted({max(1, new * (i + 1) // rows) - 1 for i in range(rows)})
    lines = [f"tiny Qwen2 (2 layers, hidden 128, 4/2 heads of dim 32, fp32, random weights), prompt {prompt}, "
             f"greedy generate to {tokens} tokens; AHN-{memory.upper()} window {window} + {sinks} sinks; "
             "1 CPU thread", ""]
    header = f"{'context':>8s}" + "".join(f" {name + ' cache':>22s} {name + ' ms/token':>25s}" for name in runs)
    lines.append(header)
    prev = 0
    for i in marks:
        row = f"{prompt + i + 1:8d}"
        for rec in runs.values():
            t0 = rec[prev - 1][0] if prev else 0.0
            ms = 1e3 * (rec[i][0] - t0) / (i - prev + 1)  # mean over the tokens since the last mark
            row += f" {rec[i][1] / 2**10:18.1f} KiB {ms:25.2f}"
        lines.append(row)
        prev = i + 1
    if plot:
        _plot(runs, prompt, plot)
        lines.append(f"\nplot written to {plot}")
    return "\n".join(lines)


def _plot(runs, prompt, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib")
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rec in runs.items():
        ctx = [prompt + i + 1 for i in range(len(rec))]
        ax_mem.plot(ctx, [b / 2**20 for _, b in rec], label=name)
        step = max(1, len(rec) // 200)  # mean ms/token over 200 buckets: single-token times are noise
        xs, ys = [], []
        for s in range(0, len(rec) - step + 1, step):
            t0 = rec[s - 1][0] if s else 0.0
            xs.append(ctx[s + step - 1])
            ys.append(1e3 * (rec[s + step - 1][0] - t0) / step)
        ax_time.plot(xs, ys, label=name)
    ax_mem.set(xlabel="context (tokens)", ylabel="cache (MiB)", title="cache size")
    ax_time.set(xlabel="context (tokens)", ylabel="ms per token", title="time per generated token")
    for ax in (ax_mem, ax_time):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
