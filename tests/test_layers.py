"""AHN layers on tiny Qwen2/Qwen3 models: equal to the base model on T <= W + S, to DESIGN §1 computed slowly beyond.

The slow model is written from DESIGN §1 and the paper's output path, in
fp64, with an explicit [T, T] mask and a per-token memory loop (one token
folded in per step, as decode does); only the base model's own parts
(embedding, norms, MLP, RoPE tables, lm_head) are reused from transformers.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

import ahn_kernels as ak
from ahn_kernels import testing
from ahn_kernels.layers import full_attention

MEMORIES = ("dn", "gdn", "mamba2")
RULE = {"dn": "delta", "gdn": "gated_delta", "mamba2": "ssd"}


def tiny_model(family="qwen2", seed=0):
    """A random 2-layer model: GQA (4 query heads, 2 kv heads), odd head dim."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=61, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=10, max_position_embeddings=256, tie_word_embeddings=False)
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**kw)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**kw)).eval()


def randomise_ahn(model, seed=1):
    """Random non-zero AHN weights (o_proj starts at zero, which would hide the memory)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ak.layers.ahn_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "proj" in name else 0.3) + (1.0 if "norm" in name else 0))
    return model


def patched(family, memory, W, S):
    base = tiny_model(family)
    return base, randomise_ahn(ak.patch_model(copy.deepcopy(base), memory=memory, window_size=W, num_sinks=S))


def rotate(x, cos, sin):
    """RoPE on [B, T, H, D] with cos/sin [B, T, D]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None] + rot * sin[:, :, None]


def l2n(x):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def slow_memory(fn, x, q, k, v, W, S):
    """DESIGN §1 by a per-token loop: mem_t reads a state that absorbed tokens S .. t-W. [B, T, HQ, D] fp64."""
    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    k, v = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)  # [B, T, HQ, D]
    lin = lambda m, y: F.linear(y, m.weight, m.bias)
    state = q.new_zeros(B, HQ, D, D)
    mem = torch.zeros_like(q)
    for t in range(T):
        e = t - W
        if e < S:
            continue
        ke, ve, xe = l2n(k[:, e]), v[:, e], x[:, e]  # the token leaving the window, with its own gates
        if isinstance(fn, ak.layers.Mamba2Memory):
            dt = F.softplus(lin(fn.dt_proj, xe) + fn.dt_bias)  # [B, HQ]
            decay = torch.exp(-dt * fn.A_log.exp())
            state = decay[..., None, None] * state + (dt[..., None] * ke)[..., :, None] * ve[..., None, :]
            scale = 1.0
        else:
            beta = torch.sigmoid(lin(fn.b_proj, xe))
            if isinstance(fn, ak.layers.GatedDeltaNetMemory):
                g = -fn.A_log.exp() * F.softplus(lin(fn.a_proj, xe) + fn.dt_bias)
                state = torch.exp(g)[..., None, None] * state
            err = ve - torch.einsum("bhkv,bhk->bhv", state, ke)
            state = state + beta[..., None, None] * ke[..., :, None] * err[..., None, :]
            scale = D ** -0.5
        mem[:, t] = scale * torch.einsum("bhkv,bhk->bhv", state, l2n(q[:, t]))
    return mem


def slow_output(fn, mem, x, eps=1e-5):
    """The paper's output path, written out: [B, T, HQ, D] -> [B, T, HQ·D]."""
    gate = F.silu(F.linear(x, fn.g_proj.weight, fn.g_proj.bias))[..., None]  # [B, T, HQ, 1]
    if isinstance(fn, ak.layers.Mamba2Memory):
        y = (mem * gate).flatten(2)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * fn.norm.weight
        y = y.view_as(mem)
    else:
        y = mem * torch.rsqrt(mem.pow(2).mean(-1, keepdim=True) + eps) * fn.o_norm.weight * gate
    return torch.einsum("bthi,hio->btho", y, fn.o_proj.weight).flatten(2)


def slow_logits(model, ids, W, S):
    """The AHN model's logits [B, T, vocab] in fp64, from DESIGN §1 with explicit masks and loops."""
    m = copy.deepcopy(model).double()
    inner = m.model
    B, T = ids.shape
    h = inner.embed_tokens(ids)
    pos = torch.arange(T)[None].expand(B, -1)
    cos, sin = inner.rotary_emb(h, pos)  # [B, T, D]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    visible = (j <= i) & ((i - j < W) | (j < S))  # [T, T]
    for layer in inner.layers:
        at, fn = layer.self_attn, layer.ahn.fn
        x = layer.input_layernorm(h)
        D = at.head_dim
        q = at.q_proj(x).view(B, T, -1, D)
        k = at.k_proj(x).view(B, T, -1, D)
        v = at.v_proj(x).view(B, T, -1, D)
        if at.q_norm is not None:
            q, k = at.q_norm(q), at.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        G = q.shape[2] // k.shape[2]
        kr, vr = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
        s = torch.einsum("bihd,bjhd->bhij", q, kr) * D ** -0.5
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
        attn = torch.einsum("bhij,bjhd->bihd", p, vr).flatten(2)
        out = attn + slow_output(fn, slow_memory(fn, x, q, k, v, W, S), x)
        h = h + at.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return m.lm_head(inner.norm(h))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_short_context_equals_base_model(family, memory):
    W, S = 6, 3
    base, model = patched(family, memory, W, S)
    ids = torch.randint(0, 61, (2, W + S))
    with torch.no_grad():
        got, ref = model(ids).logits, base(ids).logits
    testing.assert_close("logits", got, ref, 1e-5)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("W, S", [(5, 0), (4, 3)])
def test_long_context_equals_slow_model(family, memory, W, S):
    base, model = patched(family, memory, W, S)
    ids = torch.randint(0, 61, (2, 3 * W + S + 4))
    with torch.no_grad():
        got = model(ids).logits
        with full_attention(model):
            teacher = model(ids).logits
    ref = slow_logits(model, ids, W, S)
    testing.assert_close("logits", got, ref, testing.tolerance(torch.float32, "out"))
    testing.assert_close("teacher logits", teacher, base(ids).logits.detach(), 1e-5)
    assert testing.rel_rmse(got, teacher) > 1e-2, "the memory and the window must change the output"


@pytest.mark.parametrize("memory", MEMORIES)
def test_padded_rows_equal_their_unpadded_runs(memory):
    """Left and right padding: each row's real tokens give the logits of that row alone."""
    W, S = 4, 2
    _, model = patched("qwen2", memory, W, S)
    lengths = (17, 11)
    T = max(lengths)
    ids = torch.randint(0, 61, (2, T))
    for left in (True, False):
        mask = torch.zeros(2, T, dtype=torch.long)
        for b, n in enumerate(lengths):
            mask[b, slice(T - n, T) if left else slice(0, n)] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            got = model(ids, attention_mask=mask, position_ids=pos).logits
            for b, n in enumerate(lengths):
                real = mask[b].bool()
                alone = model(ids[b:b + 1, real]).logits[0]
                testing.assert_close(f"row {b} (left={left})", got[b, real], alone, 1e-5)


@pytest.mark.parametrize("memory", MEMORIES)
def test_fresh_memory_adds_nothing(memory):
    """o_proj starts at zero: a freshly patched model is plain window + sinks attention."""
    W, S = 4, 2
    model = ak.patch_model(tiny_model(), memory=memory, window_size=W, num_sinks=S)
    ids = torch.randint(0, 61, (1, 20))
    x = torch.randn(1, 20, 40)
    for layer in model.model.layers:
        mem = torch.randn(1, 20, 4, 10)
        assert (layer.ahn.fn.output(mem, x) == 0).all()
