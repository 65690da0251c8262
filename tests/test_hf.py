"""Hugging Face integration: generate through AHNModelCache, released-checkpoint loading, distillation."""

import copy

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

import ahn_kernels as ak
from ahn_kernels.layers import AHNModelCache, ahn_parameters, distill_loss
from test_layers import MEMORIES, randomise_ahn, tiny_model


def left_padded(lengths, vocab=61, seed=3):
    """A batch of prompts of different lengths, left-padded: ids, mask [B, T]."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    return ids, mask


def positions(mask):
    return (mask.cumsum(1) - 1).clamp(min=0)


def recompute_greedy(model, ids, mask, steps):
    """Greedy decoding with no cache: the whole sequence through the model for every new token."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids


def cache_buffers(cache):
    return [(t.data_ptr(), tuple(t.shape)) for layer in cache.layers
            for t in (layer.ahn.k, layer.ahn.v, layer.ahn.gates, layer.ahn.state, layer.ahn.positions)]


@pytest.mark.parametrize("family, memory", [("qwen2", m) for m in MEMORIES] + [("qwen3", "gdn")])
def test_generate_with_cache_equals_recomputation(family, memory):
    W, S = 4, 2
    model = randomise_ahn(ak.patch_model(tiny_model(family), memory=memory, window_size=W, num_sinks=S))
    ids, mask = left_padded((9, 3))
    steps = 3 * W + S
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    assert torch.equal(generated, recompute_greedy(model, ids, mask, steps))

    # The same decode by hand: the cache's buffers never move or grow once allocated.
    cache = AHNModelCache(model)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions(mask), cache=cache, use_cache=True).logits
        before = cache_buffers(cache)
        seq = ids
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq, mask = torch.cat([seq, nxt], 1), torch.cat([mask, mask.new_ones(2, 1)], 1)
            logits = model(nxt, attention_mask=mask, position_ids=positions(mask)[:, -1:], cache=cache,
                           use_cache=True).logits
    assert torch.equal(seq, generated)
    assert cache_buffers(cache) == before
    assert cache.get_seq_length() == ids.shape[1] + steps
    assert cache.layers[0].ahn.positions.tolist() == [9 + steps, 3 + steps]


def test_patch_model_bad_arguments():
    with pytest.raises(ValueError, match="memory"):
        ak.patch_model(tiny_model(), memory="lstm")
    with pytest.raises(ValueError, match="window_size"):
        ak.patch_model(tiny_model(), window_size=0)
    with pytest.raises(ValueError, match="num_sinks"):
        ak.patch_model(tiny_model(), num_sinks=-1)
    model = ak.patch_model(tiny_model(), window_size=4, num_sinks=1)
    with pytest.raises(TypeError, match="already patched"):
        ak.patch_model(model)


def test_dynamic_cache_is_refused():
    model = ak.patch_model(tiny_model(), window_size=4, num_sinks=1)
    with pytest.raises(TypeError, match="AHNModelCache"):
        model(torch.zeros(1, 3, dtype=torch.long), use_cache=True)


def qwen25_3b_on_meta(memory):
    """Qwen2.5-3B's shapes (36 layers, hidden 2048, 16/2 heads, head dim 128), no memory allocated."""
    config = Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    return ak.patch_model(model, memory=memory, window_size=32640, num_sinks=128)


# The released AHN-only checkpoints' per-layer tensors (ByteDance-Seed/AHN, src/ahn/rnn/*.py), H = 16, D = 128, hidden 2048.
RELEASED_LAYOUT = {
    "dn": {"b_proj.weight": (16, 2048), "g_proj.weight": (16, 2048), "o_norm.weight": (128,),
           "o_proj.weight": (16, 128, 128)},
    "gdn": {"b_proj.weight": (16, 2048), "a_proj.weight": (16, 2048), "A_log": (16,), "D": (16,), "dt_bias": (16,),
            "g_proj.weight": (16, 2048), "o_norm.weight": (128,), "o_proj.weight": (16, 128, 128)},
    "mamba2": {"dt_bias": (16,), "A_log": (16,), "norm.weight": (2048,), "dt_proj.weight": (16, 2048),
               "dt_proj.bias": (16,), "g_proj.weight": (16, 2048), "g_proj.bias": (16,),
               "o_proj.weight": (16, 128, 128)},
}
# The paper's README "Model Zoo": AHN parameters for Qwen2.5-3B.
RELEASED_PARAMS = {"dn": 11.8e6, "gdn": 13.0e6, "mamba2": 11.9e6}


@pytest.mark.parametrize("memory", MEMORIES)
def test_released_checkpoint_layout_loads(memory, tmp_path):
    model = qwen25_3b_on_meta(memory)
    count = sum(p.numel() for _, p in ahn_parameters(model))
    assert round(count / 1e5) == round(RELEASED_PARAMS[memory] / 1e5)
    state = {f"model.layers.{i}.ahn.fn.{name}": torch.full(shape, 0.5, dtype=torch.bfloat16)
             for i in range(36) for name, shape in RELEASED_LAYOUT[memory].items()}
    half = len(state) // 2  # a sharded checkpoint: a directory of two files
    items = list(state.items())
    save_file(dict(items[:half]), str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(dict(items[half:]), str(tmp_path / "model-00002-of-00002.safetensors"))
    ak.load_ahn_weights(model, tmp_path)

    other = "gdn" if memory != "gdn" else "dn"
    with pytest.raises(ValueError, match="missing keys .*unexpected keys"):
        ak.load_ahn_weights(qwen25_3b_on_meta(other), tmp_path)


def test_load_ahn_weights_copies_values_and_refuses_pickle(tmp_path):
    model = ak.patch_model(tiny_model(), memory="gdn", window_size=4, num_sinks=1)
    state = {n: torch.randn(p.shape) for n, p in ahn_parameters(model)}
    save_file(state, str(tmp_path / "ahn.safetensors"))
    ak.load_ahn_weights(model, tmp_path / "ahn.safetensors")
    for n, p in ahn_parameters(model):
        assert torch.equal(p, state[n])
    torch.save(state, tmp_path / "ahn.bin")
    with pytest.raises(ValueError, match="safetensors"):
        ak.load_ahn_weights(model, tmp_path / "ahn.bin")
    bad = dict(state)
    bad["model.layers.0.ahn.fn.A_log"] = torch.zeros(5)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        ak.load_ahn_weights(model, tmp_path / "bad.safetensors")


@pytest.mark.parametrize("memory", MEMORIES)
def test_distillation_lowers_kl_and_trains_only_ahn(memory):
    W, S = 4, 1
    model = ak.patch_model(tiny_model(), memory=memory, window_size=W, num_sinks=S)
    model.train()
    ids, mask = left_padded((16, 12), seed=5)
    params = [p for _, p in ahn_parameters(model)]
    assert all(p.requires_grad for p in params)
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(10):
        loss = distill_loss(model, ids, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    ahn = {id(p) for p in params}
    for name, p in model.named_parameters():
        if id(p) not in ahn:
            assert p.grad is None, name


def test_accounting_matches_the_paper_where_it_counts_the_same_things():
    from ahn_kernels import accounting

    m = accounting.CONFIGS["qwen2.5-3b"]
    W, S, T = 32640, 128, 131072
    parts = accounting.ahn_cache_bytes(m, W, S, "gdn")
    assert parts["k, v (sinks + window)"] == 36 * 2 * (W + S) * 2 * 128 * 2
    assert parts["state (fp32)"] == 36 * 16 * 128 * 128 * 4
    full = accounting.full_cache_bytes(m, T)
    kv_and_state = parts["k, v (sinks + window)"] + parts["state (fp32)"]
    assert abs(100 * (kv_and_state / full - 1) - accounting.PAPER["cache"]) < 0.5
    saving = 100 * (accounting.mean_flops(m, T, W, S, "gdn") / accounting.mean_flops(m, T) - 1)
    assert abs(saving - accounting.PAPER["flops"]) < 3
    brute = sum(accounting.flops_per_token(m, t, 100, 7) for t in range(500)) / 500
    assert accounting.mean_flops(m, 500, 100, 7) == pytest.approx(brute, rel=1e-12)
    text = accounting.report("qwen2.5-3b", T, W, S, "gdn")
    assert "-74.0%" in text and "-40.5%" in text


def test_demo_cache_stays_flat_and_full_attention_grows():
    from ahn_kernels.layers import demo

    text = demo.run(tokens=120, window=16, sinks=4, prompt=24, rows=3)
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 3
    ahn = {r[1] for r in rows}
    full = [float(r[4]) for r in rows]
    assert len(ahn) == 1, "the AHN cache never grows"
    assert full == sorted(full) and full[0] < full[-1], "the full-attention cache grows"


def test_distill_example_runs(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "distill.py"
    spec = importlib.util.spec_from_file_location("distill_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--steps", "2", "--length", "24", "--window", "8", "--sinks", "2"])
    assert "step   1" in capsys.readouterr().out
