"""The AHN decode path: swa_decode, ahn_evict_update and AHNCache against from-scratch and full-sequence results.

The decode loop is checked against the prefill formulation of the same layer:
swa_attention over the whole sequence, and the lagged delta-rule / SSD token
loops (``lag=(W, S)``) over the whole sequence.
"""

import pytest
import torch

from ahn_kernels import AHNCache, ahn_evict_update, swa_attention, swa_decode
from ahn_kernels.delta_rule import reference as delta_reference
from ahn_kernels.ssd import reference as ssd_reference
from ahn_kernels.swa import reference as swa_reference
from ahn_kernels.testing import (
    AHN_RULES,
    CACHE_WINDOWS,
    ahn_A,
    ahn_gates,
    assert_close,
    seqlens_to_cu,
    tolerance,
)

HQ, HK, D = 4, 2, 8
HS = max(HQ, HK)


def _positions(W, S):
    """Rows before the sinks end, inside the first window, at the first eviction, and after wrapping."""
    return sorted({0, max(S - 1, 0), S, S + W - 1, S + W, S + 2 * W + 1, S + 5 * W + 2})


def _l2norm(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _slot(p, W, S):
    return p if p < S else S + (p - S) % W


# ----------------------------------------------------------------------------
# 1. swa_decode vs attention over the explicit sequence
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("W, S", CACHE_WINDOWS)
def test_swa_decode_vs_scratch(W, S, dtype):
    pos = _positions(W, S)
    B = len(pos)
    seqs = [[torch.randn(p + 1, h, D).to(dtype) for h in (HQ, HK, HK)] for p in pos]  # q, k, v per row
    # Build each row's cache by placing its tokens 0..p-1; slots never written hold NaN.
    k_cache = torch.full((B, S + W, HK, D), float("nan"), dtype=dtype)
    v_cache = torch.full((B, S + W, HK, D), float("nan"), dtype=dtype)
    for b, p in enumerate(pos):
        for t in range(p):
            k_cache[b, _slot(t, W, S)] = seqs[b][1][t]
            v_cache[b, _slot(t, W, S)] = seqs[b][2][t]
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for b, p in enumerate(pos):
        expected_k[b, _slot(p, W, S)] = seqs[b][1][p]
        expected_v[b, _slot(p, W, S)] = seqs[b][2][p]
    q = torch.stack([s[0][-1] for s in seqs])[:, None]  # [B, 1, HQ, D]
    k_new = torch.stack([s[1][-1] for s in seqs])[:, None]  # [B, 1, HK, D]
    v_new = torch.stack([s[2][-1] for s in seqs])[:, None]
    ptr = k_cache.data_ptr()
    o = swa_decode(q, k_cache, v_cache, k_new, v_new, torch.tensor(pos, dtype=torch.int32), W, S)
    assert o.shape == (B, 1, HQ, D) and o.dtype == dtype and k_cache.data_ptr() == ptr
    assert torch.equal(k_cache.nan_to_num(7.0), expected_k.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), expected_v.nan_to_num(7.0))
    for b, p in enumerate(pos):
        qs, ks, vs = (x.double()[None] for x in seqs[b])
        ref, _ = swa_reference.masked(qs, ks, vs, W, S)
        assert_close(f"row {b} (p={p})", o[b], ref[0, p:p + 1], tolerance(dtype, "out"))


# ----------------------------------------------------------------------------
# 2. ahn_evict_update vs the rules written out per row and head (fp64)
# ----------------------------------------------------------------------------
def _evict_scratch(state, q, k_cache, v_cache, gates, gates_new, pos, W, S, rule, scale, A):
    """Expected (state, gates, o_mem) after one step, row by row, head by head, (I - β k kᵀ) form."""
    state, gates = state.double().clone(), gates.clone()
    B = state.shape[0]
    o = torch.zeros(B, 1, HS, D, dtype=torch.float64)
    for b, p in enumerate(pos):
        e = p - W
        if e >= S:
            slot, ring = S + (e - S) % W, (e - S) % W
            for h in range(HS):
                k = _l2norm(k_cache[b, slot, h // (HS // HK)].double())
                v = v_cache[b, slot, h // (HS // HK)].double()
                qh = _l2norm(q[b, 0, h // (HS // HQ)].double())
                gate = gates[b, ring, h].double()
                old = state[b, h]
                if rule == "ssd":
                    new = torch.exp(gate[0] * A[h].double()) * old + gate[0] * torch.outer(k, v)
                else:
                    M = torch.eye(D, dtype=torch.float64) - gate[0] * torch.outer(k, k)
                    decay = torch.exp(gate[1]) if rule == "gated_delta" else 1.0
                    new = decay * (M @ old) + gate[0] * torch.outer(k, v)
                state[b, h] = new
                o[b, 0, h] = scale * new.T @ qh
        if p >= S:
            gates[b, (p - S) % W] = gates_new[b]
    return state, gates, o


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", AHN_RULES)
@pytest.mark.parametrize("W, S", CACHE_WINDOWS)
def test_evict_update_vs_scratch(W, S, rule, dtype):
    pos = _positions(W, S)
    B = len(pos)
    state = torch.randn(B, HS, D, D)
    q = torch.randn(B, 1, HQ, D).to(dtype)
    k_cache, v_cache = torch.randn(B, S + W, HK, D).to(dtype), torch.randn(B, S + W, HK, D).to(dtype)
    gates, gates_new = ahn_gates(rule, B, W, HS), ahn_gates(rule, B, HS)
    A = ahn_A(HS) if rule == "ssd" else None
    scale = 1.0 if rule == "ssd" else D ** -0.5
    want_state, want_gates, want_o = _evict_scratch(state, q, k_cache, v_cache, gates, gates_new, pos, W, S,
                                                    rule, scale, A)
    caches = k_cache.clone(), v_cache.clone()
    o = ahn_evict_update(state, q, k_cache, v_cache, gates, gates_new, torch.tensor(pos, dtype=torch.int32),
                         W, S, rule, A=A)
    assert o.shape == (B, 1, HS, D) and o.dtype == dtype
    assert_close("state", state, want_state, tolerance(torch.float32, "out"))
    assert torch.equal(gates, want_gates.float())
    assert_close("o_mem", o, want_o, tolerance(dtype, "out"))
    assert torch.equal(k_cache, caches[0]) and torch.equal(v_cache, caches[1])
    for b, p in enumerate(pos):  # rows with an empty memory are exactly 0 and keep their state bitwise
        if p - W < S:
            assert torch.equal(o[b], torch.zeros_like(o[b])) and torch.equal(state[b], want_state[b].float())


# ----------------------------------------------------------------------------
# 3. AHNCache decode loop == the whole sequence through the prefill formulation
# ----------------------------------------------------------------------------
def _memory_reference(rule, q, k, v, gates, W, S, A):
    """Lagged memory readout [T, HS, D] of one sequence (q [T, HQ, D], k, v [T, HK, D], gates [T, HS, n]), fp64."""
    q, k, v, gates = (x.double()[None] for x in (q, k, v, gates))
    if rule == "ssd":
        G = HS // HK
        kh = _l2norm(k).repeat_interleave(G, dim=2)  # [1, T, HS, D], one group per head
        qh = _l2norm(q).repeat_interleave(HS // HQ, dim=2)
        o, _ = ssd_reference.recurrent(v.repeat_interleave(G, dim=2), gates[..., 0], A.double(), kh, qh,
                                       lag=(W, S))
    else:
        g = gates[..., 1] if rule == "gated_delta" else None
        o, _ = delta_reference.recurrent(q, k, v, gates[..., 0], g, use_qk_l2norm=True, lag=(W, S))
    return o[0]


def _decode_loop(rule, W, S, dtype, warm):
    """Decode rows of different lengths: row b runs warm[b] steps alone (through a row view), then all together.

    Returns the cache, each row's inputs (q, k, v, gates) and its per-token outputs (attn, mem).
    """
    B, n = len(warm), S + 3 * W + 3
    rows = [[torch.randn(d + n, h, D).to(dtype) for h in (HQ, HK, HK)] + [ahn_gates(rule, d + n, HS)]
            for d in warm]
    A = ahn_A(HS) if rule == "ssd" else None
    cache = AHNCache.empty(B, W, S, HK, D, HS, rule, dtype, "cpu")
    buffers = [t.data_ptr() for t in (cache.k, cache.v, cache.gates, cache.state, cache.positions)]
    outs = [([], []) for _ in warm]

    def record(b, attn, mem):
        outs[b][0].append(attn)
        outs[b][1].append(mem)

    for b, d in enumerate(warm):
        view = AHNCache(cache.k[b:b + 1], cache.v[b:b + 1], cache.gates[b:b + 1], cache.state[b:b + 1],
                        cache.positions[b:b + 1], W, S, rule)
        for t in range(d):
            attn, mem = view.step(*(x[t][None, None] for x in rows[b][:3]), rows[b][3][t][None], A=A)
            record(b, attn[0, 0], mem[0, 0])
    for s in range(n):
        q, k, v = (torch.stack([rows[b][i][d + s] for b, d in enumerate(warm)])[:, None] for i in range(3))
        gates = torch.stack([rows[b][3][d + s] for b, d in enumerate(warm)])  # [B, HS, n_gates]
        attn, mem = cache.step(q, k, v, gates, A=A)
        for b in range(B):
            record(b, attn[b, 0], mem[b, 0])
    assert [t.data_ptr() for t in (cache.k, cache.v, cache.gates, cache.state, cache.positions)] == buffers
    assert cache.positions.tolist() == [d + n for d in warm]
    return cache, rows, A, [(torch.stack(a), torch.stack(m)) for a, m in outs]


@pytest.mark.parametrize("rule", AHN_RULES)
@pytest.mark.parametrize("W, S", CACHE_WINDOWS)
def test_decode_loop_matches_full_sequence(W, S, rule, dtype=torch.float32):
    _, rows, A, outs = _decode_loop(rule, W, S, dtype, warm=(0, 2, W + S + 1))
    for b, ((q, k, v, gates), (attn, mem)) in enumerate(zip(rows, outs)):
        attn_ref = swa_attention(q[None], k[None], v[None], W, S)[0]
        assert_close(f"row {b} attention", attn, attn_ref, tolerance(dtype, "out"))
        mem_ref = _memory_reference(rule, q, k, v, gates, W, S, A)
        assert_close(f"row {b} memory", mem, mem_ref, tolerance(dtype, "out"))
        assert not mem[:S + W].any(), f"row {b}: memory read before token S + W"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_loop_low_precision(dtype):
    _, rows, A, outs = _decode_loop("gated_delta", 4, 2, dtype, warm=(0, 3))
    for b, ((q, k, v, gates), (attn, mem)) in enumerate(zip(rows, outs)):
        attn_ref, _ = swa_reference.masked(q.double()[None], k.double()[None], v.double()[None], 4, 2)
        assert_close(f"row {b} attention", attn, attn_ref[0], tolerance(dtype, "out"))
        mem_ref = _memory_reference("gated_delta", q, k, v, gates, 4, 2, A)
        assert_close(f"row {b} memory", mem, mem_ref, tolerance(dtype, "out"))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rule", AHN_RULES)
@pytest.mark.parametrize("W, S", CACHE_WINDOWS)
def test_prefill_then_decode_matches_full_sequence(W, S, rule, packed):
    """Prefill (packed prompts of different lengths, or a dense batch), then decode: the same outputs as one pass."""
    lengths = (0, 2, S + W - 1, S + W + 5, S + 3 * W + 2) if packed else (S + 2 * W + 1,) * 2
    n, B = 2 * W + 1, len(lengths)
    rows = [[torch.randn(L + n, h, D) for h in (HQ, HK, HK)] + [ahn_gates(rule, L + n, HS)] for L in lengths]
    A = ahn_A(HS) if rule == "ssd" else None
    cache = AHNCache.empty(B, W, S, HK, D, HS, rule, torch.float32, "cpu")
    prompt = [torch.cat([r[i][:L] for r, L in zip(rows, lengths)])[None] for i in range(4)]
    if not packed:
        prompt = [torch.stack([r[i][:L] for r, L in zip(rows, lengths)]) for i in range(4)]
    cu = seqlens_to_cu(lengths, dtype=torch.int32) if packed else None
    attn, mem = cache.prefill(*prompt, A=A, cu_seqlens=cu)
    if packed:
        attn, mem = (list(x[0].split(lengths)) for x in (attn, mem))
    attn, mem = [[x] for x in attn], [[x] for x in mem]
    for s in range(n):
        step = [torch.stack([r[i][L + s] for r, L in zip(rows, lengths)]) for i in range(4)]
        a, m = cache.step(*(x[:, None] for x in step[:3]), step[3], A=A)
        for b in range(B):
            attn[b].append(a[b])
            mem[b].append(m[b])
    for b, (q, k, v, gates) in enumerate(rows):
        attn_ref = swa_attention(q[None], k[None], v[None], W, S)[0]
        assert_close(f"row {b} attention", torch.cat(attn[b]), attn_ref, tolerance(torch.float32, "out"))
        mem_ref = _memory_reference(rule, q, k, v, gates, W, S, A)
        assert_close(f"row {b} memory", torch.cat(mem[b]), mem_ref, tolerance(torch.float32, "out"))


@pytest.mark.parametrize("W, S", CACHE_WINDOWS)
def test_eviction_labels(W, S):
    """Tokens labelled by position: the state holds exactly tokens S .. p-W, each with its own gates.

    Rule ssd with A = 0 sums dt_j k̂_j v_jᵀ. Token j has k_j = e_j (one-hot),
    v_j = 1 and dt_j = j + 1, so state row j is (j + 1) / sqrt(1 + 1e-6) iff j was
    absorbed, with its own arrival-time dt: a gate or key read after the new
    token overwrote its slot would land in the wrong row or with the wrong value.
    """
    T = S + 3 * W + 2
    cache = AHNCache.empty(1, W, S, 1, T, 1, "ssd", torch.float32, "cpu")
    A = torch.zeros(1)
    for p in range(T):
        k = torch.zeros(1, 1, 1, T)
        k[..., p] = 1.0
        cache.step(torch.ones(1, 1, 1, T), k, torch.ones(1, 1, 1, T), torch.full((1, 1, 1), p + 1.0), A=A)
        absorbed = torch.zeros(T)
        absorbed[S:max(S, p - W + 1)] = torch.arange(S, max(S, p - W + 1)) + 1.0
        want = (absorbed / (1 + 1e-6) ** 0.5)[:, None].expand(T, T)
        torch.testing.assert_close(cache.state[0, 0], want, rtol=1e-6, atol=1e-6, msg=f"after token {p}")
        # the ring holds the sinks and the last W tokens, each in its slot, with its own gate
        for t in list(range(min(S, p + 1))) + list(range(max(S, p - W + 1), p + 1)):
            assert cache.k[0, _slot(t, W, S), 0].argmax().item() == t
            if t >= S:
                assert cache.gates[0, (t - S) % W, 0, 0].item() == t + 1


# ----------------------------------------------------------------------------
# 3b. conservation: any split of a sequence into prefill chunks and decode steps
#     gives the per-token outputs and final state of one whole-sequence pass
# ----------------------------------------------------------------------------
def _ahn_layer_reference(rule, q, k, v, gates, W, S, A):
    """The AHN layer of DESIGN §1 over one whole sequence, fp64: attention [T, HQ, D], memory [T, HS, D], state [HS, D, D]."""
    attn, _ = swa_reference.masked(q.double()[None], k.double()[None], v.double()[None], W, S)
    qd, kd, vd, gd = (x.double()[None] for x in (q, k, v, gates))
    if rule == "ssd":
        G = HS // HK
        mem, final = ssd_reference.recurrent(vd.repeat_interleave(G, dim=2), gd[..., 0], A.double(),
                                             _l2norm(kd).repeat_interleave(G, dim=2),
                                             _l2norm(qd).repeat_interleave(HS // HQ, dim=2), lag=(W, S))
        final = final.transpose(-1, -2)  # mamba's [V, K] -> [K, V]
    else:
        g = gd[..., 1] if rule == "gated_delta" else None
        mem, final = delta_reference.recurrent(qd, kd, vd, gd[..., 0], g, use_qk_l2norm=True, lag=(W, S))
    return attn[0], mem[0], final[0]


def _conservation_draw(rule, W, S, seed):
    """One seeded draw: B sequences, each fed as a few prefill chunks (packed, random lengths, 0 allowed)
    and then decode steps, all rows together, so that rows sit at different positions throughout."""
    gen = torch.Generator().manual_seed(seed)

    def rand_int(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    B, cap = 3, 3 * W + S
    steps = rand_int(0, W + 2)
    lengths = [rand_int(steps, cap) for _ in range(B)]
    rows = [[torch.randn(L, h, D, generator=gen) for h in (HQ, HK, HK)] + [ahn_gates(rule, L, HS)] for L in lengths]
    A = ahn_A(HS) if rule == "ssd" else None
    cache = AHNCache.empty(B, W, S, HK, D, HS, rule, torch.float32, "cpu")
    outs = [([], []) for _ in range(B)]
    done = [0] * B  # tokens fed per row
    for chunk in range(rand_int(1, 3)):
        last = chunk == 2
        take = [L - steps - d if last else rand_int(0, L - steps - d) for L, d in zip(lengths, done)]
        prompt = [torch.cat([r[i][d:d + n] for r, d, n in zip(rows, done, take)])[None] for i in range(4)]
        attn, mem = cache.prefill(*prompt, A=A, cu_seqlens=seqlens_to_cu(take, dtype=torch.int32))
        for b, (a, m) in enumerate(zip(attn[0].split(take), mem[0].split(take))):
            outs[b][0].append(a)
            outs[b][1].append(m)
        done = [d + n for d, n in zip(done, take)]
    rest = [L - steps - d for L, d in zip(lengths, done)]  # what the chunks left: one more prefill
    if any(rest):
        prompt = [torch.cat([r[i][d:d + n] for r, d, n in zip(rows, done, rest)])[None] for i in range(4)]
        attn, mem = cache.prefill(*prompt, A=A, cu_seqlens=seqlens_to_cu(rest, dtype=torch.int32))
        for b, (a, m) in enumerate(zip(attn[0].split(rest), mem[0].split(rest))):
            outs[b][0].append(a)
            outs[b][1].append(m)
    assert cache.positions.tolist() == [L - steps for L in lengths]
    for s in range(steps):
        step = [torch.stack([r[i][L - steps + s] for r, L in zip(rows, lengths)]) for i in range(4)]
        attn, mem = cache.step(*(x[:, None] for x in step[:3]), step[3], A=A)
        for b in range(B):
            outs[b][0].append(attn[b])
            outs[b][1].append(mem[b])
    return cache, rows, A, outs


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("rule", AHN_RULES)
@pytest.mark.parametrize("W, S", CACHE_WINDOWS)
def test_conservation_any_split(W, S, rule, seed):
    cache, rows, A, outs = _conservation_draw(rule, W, S, seed)
    tol = tolerance(torch.float32, "out")
    for b, ((q, k, v, gates), (attn, mem)) in enumerate(zip(rows, outs)):
        attn_ref, mem_ref, state_ref = _ahn_layer_reference(rule, q, k, v, gates, W, S, A)
        assert_close(f"row {b} attention", torch.cat(attn), attn_ref, tol)
        assert_close(f"row {b} memory", torch.cat(mem), mem_ref, tol)
        assert_close(f"row {b} state", cache.state[b], state_ref, tol)


def test_decode_copies_no_kv_at_full_window():
    """W = 4096: once the window is full, decode steps keep every cache buffer where it is (no K/V copy)."""
    W, S, B, hk, d = 4096, 2, 2, 1, 4
    cache = AHNCache.empty(B, W, S, hk, d, hk, "gated_delta", torch.float32, "cpu")
    T = S + W + 3
    prompt = [torch.randn(B, T, h, d) for h in (hk, hk, hk)] + [ahn_gates("gated_delta", B, T, hk)]
    cache.prefill(*prompt)
    cache.positions[1] += 5  # rows at different positions
    buffers = [(t.data_ptr(), t.shape) for t in (cache.k, cache.v, cache.gates, cache.state, cache.positions)]
    for _ in range(3):
        q, k, v = (torch.randn(B, 1, hk, d) for _ in range(3))
        cache.step(q, k, v, ahn_gates("gated_delta", B, hk))
        assert [(t.data_ptr(), t.shape) for t in (cache.k, cache.v, cache.gates, cache.state, cache.positions)] \
            == buffers
    assert cache.positions.tolist() == [T + 3, T + 8]


# ----------------------------------------------------------------------------
# 4. registration: opcheck (mutating ops), torch.compile of a decode step
# ----------------------------------------------------------------------------
def test_opcheck_swa_decode():
    W, S = 3, 2
    pos = torch.tensor([0, 2, 4, 9], dtype=torch.int32)
    kc, vc = torch.randn(4, S + W, HK, D), torch.randn(4, S + W, HK, D)
    q, kn, vn = torch.randn(4, 1, HQ, D), torch.randn(4, 1, HK, D), torch.randn(4, 1, HK, D)
    torch.library.opcheck(torch.ops.ahn.swa_decode.default, (q, kc, vc, kn, vn, pos, W, S, 0.3))


@pytest.mark.parametrize("rule", ["gated_delta", "ssd"])
def test_opcheck_evict_update(rule):
    W, S = 3, 2
    pos = torch.tensor([0, 2, 5, 9], dtype=torch.int32)
    state = torch.randn(4, HS, D, D)
    q, kc, vc = torch.randn(4, 1, HQ, D), torch.randn(4, S + W, HK, D), torch.randn(4, S + W, HK, D)
    gates, gates_new = ahn_gates(rule, 4, W, HS), ahn_gates(rule, 4, HS)
    A = ahn_A(HS) if rule == "ssd" else None
    torch.library.opcheck(torch.ops.ahn.ahn_evict_update.default,
                          (state, q, kc, vc, gates, gates_new, pos, W, S, rule, 0.5, A))


def test_compile_decode_step_fullgraph():
    """A whole AHNCache.step compiles without graph breaks (no host sync, no data-dependent shape)."""
    W, S, B = 3, 1, 2

    def step(k_cache, v_cache, gates, state, positions, q, k, v, g):
        return AHNCache(k_cache, v_cache, gates, state, positions, W, S, "gated_delta").step(q, k, v, g)

    compiled = torch.compile(step, fullgraph=True)
    eager_cache = AHNCache.empty(B, W, S, HK, D, HS, "gated_delta", torch.float32, "cpu")
    eager_cache.positions.copy_(torch.tensor([0, 5], dtype=torch.int32))
    buffers = [eager_cache.k, eager_cache.v, eager_cache.gates, eager_cache.state, eager_cache.positions]
    compiled_buffers = [t.clone() for t in buffers]
    for _ in range(2 * (S + W)):
        inputs = (torch.randn(B, 1, HQ, D), torch.randn(B, 1, HK, D), torch.randn(B, 1, HK, D),
                  ahn_gates("gated_delta", B, HS))
        want = step(*buffers, *inputs)
        got = compiled(*compiled_buffers, *inputs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    for a, b in zip(compiled_buffers, buffers):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_step():
    """AHNCache.step captured once in a CUDA graph, replayed with new inputs, equals eager steps."""
    W, S, B, rule = 4, 2, 3, "gated_delta"

    def empty():
        return AHNCache.empty(B, W, S, HK, D, HS, rule, torch.bfloat16, "cuda")

    graphed, eager = empty(), empty()
    q, k, v = (torch.zeros(B, 1, h, D, dtype=torch.bfloat16, device="cuda") for h in (HQ, HK, HK))
    gates = torch.zeros(B, HS, 2, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a scratch cache, as capture requires
        scratch = empty()
        for _ in range(2):
            scratch.step(q, k, v, gates)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn, mem = graphed.step(q, k, v, gates)
    for _ in range(3 * W + S):
        inputs = [torch.randn(x.shape, device="cuda").to(x.dtype) for x in (q, k, v)]
        inputs.append(ahn_gates(rule, B, HS, device="cuda"))
        for static, new in zip((q, k, v, gates), inputs):
            static.copy_(new)
        graph.replay()
        want_attn, want_mem = eager.step(*inputs)
        torch.testing.assert_close(attn, want_attn)
        torch.testing.assert_close(mem, want_mem)
    assert torch.equal(graphed.positions, eager.positions)
    torch.testing.assert_close(graphed.state, eager.state)


# ----------------------------------------------------------------------------
# 5. bad inputs name the argument
# ----------------------------------------------------------------------------
def test_bad_inputs():
    W, S, B = 3, 1, 2
    q, kn, vn = torch.randn(B, 1, HQ, D), torch.randn(B, 1, HK, D), torch.randn(B, 1, HK, D)
    kc, vc = torch.zeros(B, S + W, HK, D), torch.zeros(B, S + W, HK, D)
    pos = torch.zeros(B, dtype=torch.int32)
    decode = dict(q=q, k_cache=kc, v_cache=vc, k_new=kn, v_new=vn, cache_seqlens=pos, window_size=W, num_sinks=S)
    for change, exc, text in [
        (dict(k_cache=torch.zeros(B, S + W + 1, HK, D)), ValueError, "k_cache"),
        (dict(v_cache=vc.half()), TypeError, "v_cache"),
        (dict(cache_seqlens=pos.long()), TypeError, "cache_seqlens"),
        (dict(cache_seqlens=torch.tensor([0, -1], dtype=torch.int32)), ValueError, "cache_seqlens"),
        (dict(k_new=torch.randn(B, 2, HK, D)), ValueError, "k_new"),
        (dict(window_size=0), ValueError, "window_size"),
    ]:
        with pytest.raises(exc, match=text):
            swa_decode(**{**decode, **change})
    evict = dict(state=torch.zeros(B, HS, D, D), q=q, k_cache=kc, v_cache=vc, gates=torch.zeros(B, W, HS, 2),
                 gates_new=torch.zeros(B, HS, 2), cache_seqlens=pos, window_size=W, num_sinks=S, rule="gated_delta")
    for change, exc, text in [
        (dict(rule="mamba"), ValueError, "rule"),
        (dict(state=torch.zeros(B, HS, D, D, dtype=torch.float64)), TypeError, "state"),
        (dict(state=torch.zeros(B, HS + 1, D, D)), ValueError, "state"),
        (dict(gates=torch.zeros(B, W, HS, 1)), ValueError, "gates"),
        (dict(gates_new=torch.zeros(B, HS, 2).half()), TypeError, "gates_new"),
        (dict(A=torch.zeros(HS)), ValueError, "A"),
        (dict(rule="ssd", gates=torch.zeros(B, W, HS, 1), gates_new=torch.zeros(B, HS, 1)), ValueError, "A"),
        (dict(k_cache=torch.zeros(B, S + W, 3, D), v_cache=torch.zeros(B, S + W, 3, D)), ValueError, "heads"),
    ]:
        with pytest.raises(exc, match=text):
            ahn_evict_update(**{**evict, **change})
