"""shine.py against slow references on tiny Qwen3 / Llama models built from a config."""
import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import tiny_llama, tiny_qwen3
from einops import rearrange

from shine import (LLAMA_LINEARS, M2PTransformer, Shine, ShineConfig, decoding_layout, lora_applied, lora_from_states,
                   lora_merged, lora_shapes, merge_lora, num_memory_tokens, save_peft_adapter, target_linears,
                   unmerge_lora)

SMALL = ShineConfig(lora_rank=2, meta_lora_rank=4, m2p_layers=2)


def random_lora(model, batch=None, rank=3, std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    return {l: {n: (torch.randn(*lead, i, rank, generator=g) * std, torch.randn(*lead, rank, o, generator=g) * std)
                for n, (i, o) in lora_shapes(model).items()} for l in range(model.config.num_hidden_layers)}


def explicit_model(model, lora, example=0):
    """A deep copy whose weights are W + (A B)^T written out by hand: the slow reference."""
    import copy
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for l, linears in enumerate(target_linears(ref, LLAMA_LINEARS)):
            for name, linear in linears.items():
                A, B = lora[l][name]
                A, B = (A[example], B[example]) if A.dim() == 3 else (A, B)
                linear.weight += torch.einsum("ir,ro->oi", A, B)
    return ref


def test_qwen3_8b_shape_gives_paper_d_and_m():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    with torch.device("meta"):
        llm = Qwen3ForCausalLM(config)
    shapes = lora_shapes(llm)
    assert sum(i + o for i, o in shapes.values()) == 75_776
    assert num_memory_tokens(8, shapes, 4096) == 148
    shine = Shine(llm)  # on meta: no memory used, but every shape is real
    assert tuple(shine.memory.shape) == (148, 4096) and shine.m2p.blocks[0].attn.heads == 32


@pytest.mark.parametrize("make", [tiny_qwen3, tiny_llama])
def test_hooks_equal_merged_equal_explicit_reference(make):
    model = make()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    lora = random_lora(model, batch=1)
    base = model(ids).logits
    with lora_applied(model, lora):
        hooked = model(ids).logits
    with lora_merged(model, lora):
        merged = model(ids).logits
    reference = explicit_model(model, lora)(ids).logits
    assert (hooked - base).abs().max() > 1e-2  # the LoRA really changes the output
    torch.testing.assert_close(hooked, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model(ids).logits, base)  # unmerged again


@pytest.mark.parametrize("keep_on", ["cpu", None])
def test_unmerge_restores_bf16_weights_exactly(qwen, keep_on):
    model = qwen.to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = merge_lora(model, random_lora(model), keep_on=keep_on)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[q], model.state_dict()[q])
    unmerge_lora(model, originals)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


GPU_INDUCTOR = pytest.param("inductor", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="Inductor's Triton kernels need a GPU"))


@pytest.mark.parametrize("batch", [None, 2])
def test_decoding_layout_keeps_every_value_and_stores_the_rank_axis_outermost(qwen, batch):
    lora = random_lora(qwen, batch=batch)
    moved = decoding_layout(lora)
    assert sorted(moved) == sorted(lora)
    for l, modules in lora.items():
        assert list(moved[l]) == list(modules)
        for name, (A, B) in modules.items():
            A2, B2 = moved[l][name]
            assert torch.equal(A2, A) and torch.equal(B2, B)  # same shapes and values
            assert A2.mT.is_contiguous() and B2.mT.is_contiguous() and not A2.is_contiguous()  # (.., r, I), (.., O, r)
    ids = torch.randint(0, 128, (2, 5))
    with lora_applied(qwen, lora):
        expected = qwen(ids).logits
    with lora_applied(qwen, moved):
        torch.testing.assert_close(qwen(ids).logits, expected)


@pytest.mark.parametrize("backend", ["eager", GPU_INDUCTOR])
@pytest.mark.parametrize("batch", [None, 3])
@pytest.mark.parametrize("layout", ["generated", "decoding"])
def test_compiled_decoding_step_with_hooks_equals_the_reference(qwen, batch, backend, layout):
    """A decoding step (one token per sequence) compiled with the hooks traced, which then take the fusable sums
    (shine.FUSED_LORA_TOKENS): the same logits as eager and as the explicit W + (A B)^T model, each sequence with
    its own adapter (or one shared), with the factors as generated or in `decoding_layout`. "eager" checks what
    dynamo traces; "inductor" also runs the fused kernels."""
    device = "cuda" if backend == "inductor" else "cpu"
    qwen = qwen.to(device)
    ids = torch.randint(0, 128, (3, 1), device=device)
    lora = {l: {n: (A.to(device), B.to(device)) for n, (A, B) in m.items()}
            for l, m in random_lora(qwen, batch=batch).items()}
    lora = decoding_layout(lora) if layout == "decoding" else lora
    with lora_applied(qwen, lora):
        eager = qwen(ids).logits
        compiled = torch.compile(qwen, backend=backend, fullgraph=True)(ids).logits
    torch._dynamo.reset()
    assert (eager - qwen(ids).logits).abs().max() > 1e-2
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
    for b in range(3):
        reference = explicit_model(qwen, lora, example=b)(ids[b:b + 1]).logits
        torch.testing.assert_close(compiled[b:b + 1], reference, atol=1e-5, rtol=1e-4)


def test_batch_of_different_loras_equals_each_alone(qwen):
    ids = torch.randint(0, 128, (3, 9))
    lora = random_lora(qwen, batch=3)
    with lora_applied(qwen, lora):
        batched = qwen(ids).logits
    for b in range(3):
        alone = {l: {n: (A[b:b + 1], B[b:b + 1]) for n, (A, B) in mods.items()} for l, mods in lora.items()}
        with lora_applied(qwen, alone):
            torch.testing.assert_close(batched[b:b + 1], qwen(ids[b:b + 1]).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch", [None, 2])
def test_hook_gradients_equal_the_merged_weight_reference(qwen, batch):
    """The hooks add x A B into the linear's output in place; the factors' gradients must still be those of the
    explicit model with W + (A B)^T as its weights (one adapter per sequence, or one shared)."""
    ids = torch.randint(0, 128, (2, 8))
    lora = random_lora(qwen, batch=batch)
    leaves = [t.requires_grad_() for mods in lora.values() for pair in mods.values() for t in pair]
    with lora_applied(qwen, lora):
        hooked = qwen(ids).logits
    hooked.square().mean().backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    names = {id(module): f"{name}.weight" for name, module in qwen.named_modules()}
    rows = [slice(b, b + 1) for b in range(2)] if batch else [slice(0, 2)]
    for b, row in enumerate(rows):  # the explicit model, one sequence at a time when each has its own adapter
        weights = {names[id(linear)]: linear.weight + torch.einsum("ir,ro->oi", *(t[b] if batch else t
                                                                               for t in lora[l][n]))
                   for l, linears in enumerate(target_linears(qwen, LLAMA_LINEARS)) for n, linear in linears.items()}
        reference = torch.func.functional_call(qwen, weights, (ids[row],)).logits
        (reference.square().sum() / hooked.numel()).backward()
    assert all(g.abs().max() > 0 for g in grads)
    for g, t in zip(grads, leaves):
        torch.testing.assert_close(g, t.grad, atol=1e-6, rtol=1e-4)


def test_hooks_under_autocast_with_an_fp32_model(qwen):
    """An fp32 model under bf16 autocast: bf16 outputs, fp32 factors. The hooks cast like autocast (no in-place
    add across dtypes) and match the explicit reference to bf16 precision."""
    ids = torch.randint(0, 128, (2, 8))
    lora = random_lora(qwen, batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16), lora_applied(qwen, lora):
        hooked = qwen(ids).logits.float()
    for b in range(2):
        reference = explicit_model(qwen, lora, example=b)(ids[b:b + 1]).logits
        torch.testing.assert_close(hooked[b:b + 1], reference, atol=0.05, rtol=0.05)


def test_hooks_are_removed_also_on_exceptions(qwen):
    ids = torch.randint(0, 128, (1, 5))
    base = qwen(ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with lora_applied(qwen, random_lora(qwen)):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in qwen.modules())
    torch.testing.assert_close(qwen(ids).logits, base)


def test_lora_errors_are_clear(qwen):
    lora = random_lora(qwen)
    with pytest.raises(ValueError, match="layers"):
        with lora_applied(qwen, {0: lora[0]}):
            pass
    bad = {l: dict(m) for l, m in lora.items()}
    bad[1]["q_proj"] = (torch.zeros(5, 3), torch.zeros(3, 64))
    with pytest.raises(ValueError, match="layer 1 q_proj"):
        with lora_applied(qwen, bad):
            pass
    with pytest.raises(ValueError, match="no linear named"):
        Shine(qwen, ShineConfig(target_modules=("q_proj", "c_attn")))


def test_lora_factors_cast_together_keep_values_and_gradients(qwen):
    """lora_applied casts all factors in one concatenated tensor (shine._cast_together): each module's own factors
    cast, and every factor's gradient arrives (cast back to fp32) at its own parameter."""
    from shine import _cast_together

    meta = Shine(qwen, SMALL).meta_lora
    with torch.no_grad():
        for p in meta.parameters():
            p.normal_()
    weights = [(l, w) for l, layer in enumerate(meta.layers) for w in layer.values()]
    factors = [t for _, w in weights for t in (w.A, w.B)]
    cast = _cast_together(factors, [torch.bfloat16] * len(factors))
    for (l, w), A, B in zip(weights, cast[::2], cast[1::2]):
        assert A.dtype == B.dtype == torch.bfloat16 and A.shape == w.A.shape and B.shape == w.B.shape
        assert torch.equal(A, w.A.to(torch.bfloat16)) and torch.equal(B, w.B.to(torch.bfloat16))
    pairs = zip(weights, cast[::2], cast[1::2])
    sum((l + 1) * A.float().sum() + 2 * B.float().sum() for (l, _), A, B in pairs).backward()
    for l, w in weights:
        assert torch.equal(w.A.grad, torch.full_like(w.A, l + 1)) and torch.equal(w.B.grad, torch.full_like(w.B, 2.0))
    same = _cast_together(factors, [torch.float32] * len(factors))
    assert all(s is f for s, f in zip(same, factors))  # no cast: the parameters themselves


@pytest.mark.parametrize("memory_norm", ["none", "rms", "backbone"])
def test_gradients_reach_exactly_the_hypernetwork(qwen, memory_norm):
    shine = Shine(qwen, replace(SMALL, memory_norm=memory_norm))
    with torch.no_grad():  # B = 0 would block gradients to the Meta-LoRA's A on the first step
        for p in shine.meta_lora.parameters():
            p.normal_(0, 0.02)
    ctx, q = torch.randint(0, 128, (2, 7)), torch.randint(0, 128, (2, 6))
    labels = q.clone()
    labels[:, :3] = -100
    shine(ctx, torch.ones_like(ctx), q, torch.ones_like(q), labels).backward()
    for name, p in shine.named_parameters():
        if name.startswith("llm."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_padded_batch_gives_each_contexts_memory_states(qwen):
    shine = Shine(qwen, SMALL)
    with torch.no_grad():
        for p in shine.meta_lora.parameters():
            p.normal_(0, 0.05)
        shine.memory.normal_()
    a, b = torch.randint(1, 128, (1, 11)), torch.randint(1, 128, (1, 4))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = (torch.arange(11) >= torch.tensor([[0], [7]])).long()
    batch = shine.memory_states(ids, mask)
    assert batch.shape == (2, 2, shine.num_memory, 64)
    torch.testing.assert_close(batch[0], shine.memory_states(a)[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch[1], shine.memory_states(b)[0], atol=1e-5, rtol=1e-4)


def test_memory_states_are_every_layers_output_at_the_memory_rows(qwen):
    """Eqs. 1-3 against a plain forward: context embeddings then memory embeddings, Meta-LoRA hooks, every layer's
    whole output kept; the memory states are its last M rows. The last layer's MLP saw only those M rows (its
    context rows are read by nothing) and is whole again afterwards."""
    shine = Shine(qwen, SMALL)
    with torch.no_grad():
        for p in shine.meta_lora.parameters():
            p.normal_(0, 0.05)
        shine.memory.normal_()
    ids, M = torch.randint(1, 128, (2, 9)), shine.num_memory
    mask = (torch.arange(9) >= torch.tensor([[0], [3]])).long()
    last_mlp = qwen.model.layers[-1].mlp
    rows_seen = []
    seen = last_mlp.down_proj.register_forward_hook(lambda m, inputs, out: rows_seen.append(inputs[0].shape[1]))
    with torch.no_grad():
        got = shine.memory_states(ids, mask)
        x = torch.cat([qwen.get_input_embeddings()(ids), shine.memory.expand(2, M, -1)], 1)
        full_mask = torch.cat([mask, torch.ones(2, M, dtype=torch.long)], 1)
        outputs = []
        keep = [layer.register_forward_hook(lambda m, inputs, out: outputs.append(out[0] if isinstance(out, tuple)
                                                                                 else out))
                for layer in qwen.model.layers]
        with lora_applied(qwen, shine.meta_lora.as_lora()):
            qwen.model(inputs_embeds=x, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0))
        for handle in (seen, *keep):
            handle.remove()
    assert rows_seen == [M, 9 + M]  # memory_states, then the plain forward
    assert "forward" not in last_mlp.__dict__
    expected = torch.stack([out[:, -M:] for out in outputs], dim=1)  # (B, L, M, H)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_merged_meta_lora_gives_the_hooks_memory_states_and_refuses_training(qwen):
    """Shine.meta_lora_merged: the memory pass on weights W + A B equals the hooked one (a padded batch, fp32), the
    LLM's weights stay untouched and the copies go with the block; a pass that could train the Meta-LoRA, or one
    after it changed, raises instead of silently using stale or gradient-free weights."""
    shine = Shine(qwen, SMALL)
    with torch.no_grad():
        for p in shine.meta_lora.parameters():
            p.normal_(0, 0.05)
        shine.memory.normal_()
    ids = torch.randint(1, 128, (2, 11))
    mask = (torch.arange(11) >= torch.tensor([[0], [4]])).long()
    weights = {k: v.clone() for k, v in qwen.state_dict().items()}
    with torch.no_grad():
        hooked, bare = shine.memory_states(ids, mask), Shine(qwen, SMALL).memory_states(ids, mask)
        with shine.meta_lora_merged():
            merged = shine.memory_states(ids, mask)
    assert (hooked - bare).abs().max() > 1e-2  # the Meta-LoRA matters here
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(v, weights[k]) for k, v in qwen.state_dict().items()) and shine._meta_merged is None
    with shine.meta_lora_merged():
        with pytest.raises(RuntimeError, match="for inference"):
            shine.memory_states(ids, mask)
        with torch.no_grad():
            shine.meta_lora.layers[0]["q_proj"].B.add_(1.0)
            with pytest.raises(RuntimeError, match="stale"):
                shine.memory_states(ids, mask)


def test_memory_norm_scales_what_the_m2p_reads(qwen):
    with torch.no_grad():  # norm gains the backbone learned, not the ones it was built with
        for module in qwen.modules():
            if type(module).__name__.endswith("RMSNorm") and module.weight.shape == (64,):
                module.weight.uniform_(0.2, 3.0)
    shine = Shine(qwen, SMALL)
    with torch.no_grad():
        shine.memory.normal_(0, 30.0)  # raw states far from unit size, as trained memory tokens become
        for p in shine.m2p.parameters():
            p.normal_(0, 0.05)
    ctx = torch.randint(0, 128, (2, 9))
    raw = shine.memory_states(ctx)  # (B, L, M, H)
    rms = raw / raw.pow(2).mean(-1, keepdim=True).sqrt()
    layers, final = shine.llm.model.layers, shine.llm.model.norm
    gains = torch.stack([layers[1].input_layernorm.weight, final.weight])  # what reads layer 0's / layer 1's output
    eps = torch.tensor([layers[1].input_layernorm.variance_epsilon, final.variance_epsilon])
    backbone = gains[:, None, :] * raw / (raw.pow(2).mean(-1, keepdim=True) + eps[:, None, None]).sqrt()
    for mode, expected in [("none", raw), ("rms", rms), ("backbone", backbone)]:
        shine.config.memory_norm = mode
        torch.testing.assert_close(shine.normalize_memory(raw), expected, atol=1e-5, rtol=1e-4)
        lora = shine.generate_lora(ctx)  # the M2P reads the normalized states
        reference = lora_from_states(shine.m2p(expected), shine.shapes, 2, "rl", shine.config.lora_scale)
        torch.testing.assert_close(lora[1]["down_proj"][1], reference[1]["down_proj"][1])
    assert not torch.allclose(rms, raw) and not torch.allclose(backbone, rms)
    with pytest.raises(ValueError, match="memory_norm must be one of"):
        ShineConfig(memory_norm="layer")


def test_hugging_face_checkpointing_is_refused_without_a_deprecation_warning(qwen):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FutureWarning from a deprecated transformers property either
        Shine(qwen, SMALL)
    qwen.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        Shine(qwen, SMALL)


def test_context_errors_are_clear(qwen):
    shine = Shine(qwen, SMALL)
    with pytest.raises(ValueError, match="empty context"):
        shine.memory_states(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty context"):
        shine.memory_states(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="window"):
        shine.memory_states(torch.ones(1, 512, dtype=torch.long))
    with pytest.raises(ValueError, match="left-padded"):
        shine.memory_states(torch.ones(1, 3, dtype=torch.long), torch.tensor([[1, 1, 0]]))


@pytest.mark.parametrize("first", ["column", "row"])
def test_column_blocks_mix_layers_and_row_blocks_mix_tokens(first):
    torch.manual_seed(0)
    m2p = M2PTransformer(num_layers=4, num_memory=5, hidden=16, depth=1, heads=2, mlp_ratio=2.0, first=first)
    z = torch.randn(1, 4, 5, 16)
    bumped = z.clone()
    bumped[0, 1, 2] += 1.0  # one cell: layer 1, memory token 2
    moved = (m2p(bumped) - m2p(z)).abs().amax(-1)[0] > 1e-6  # (L, M)
    expected = torch.zeros(4, 5, dtype=torch.bool)
    if first == "column":
        expected[:, 2] = True  # the whole column of token 2, across layers
    else:
        expected[1, :] = True  # the whole row of layer 1, across tokens
    assert torch.equal(moved, expected)


def test_m2p_blocks_alternate_and_match_a_slow_reference():
    torch.manual_seed(0)
    m2p = M2PTransformer(num_layers=3, num_memory=4, hidden=8, depth=2, heads=2, mlp_ratio=2.0)
    assert [b.axis for b in m2p.blocks] == ["column", "row"]
    with torch.no_grad():
        m2p.layer_embedding.normal_()
        m2p.token_embedding.normal_()
    z = torch.randn(2, 3, 4, 8)

    def block(x, blk):  # x (S, T, H), attention written out with torch's MultiheadAttention
        mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        mha.in_proj_weight.data, mha.in_proj_bias.data = blk.attn.qkv.weight, blk.attn.qkv.bias
        mha.out_proj.weight.data, mha.out_proj.bias.data = blk.attn.out.weight, blk.attn.out.bias
        x = blk.norm1(x + mha(x, x, x, need_weights=False)[0])
        return blk.norm2(x + blk.mlp[2](torch.nn.functional.gelu(blk.mlp[0](x))))

    ref = z + m2p.layer_embedding[:, None] + m2p.token_embedding[None]
    ref = torch.stack([block(ref[b].transpose(0, 1), m2p.blocks[0]).transpose(0, 1) for b in range(2)])
    ref = torch.stack([block(ref[b], m2p.blocks[1]) for b in range(2)])
    torch.testing.assert_close(m2p(z), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["rl", "rr", "lr", "ll"])
def test_lora_reshape_modes_cut_the_vector_as_appendix_a2(mode):
    shapes = {"q_proj": (3, 2), "down_proj": (2, 4)}  # D = 11, r = 2 -> 22 values of M * H = 3 * 8
    states = torch.randn(2, 5, 3, 8)
    lora = lora_from_states(states, shapes, rank=2, mode=mode, scale=0.01)
    for l in range(5):
        for b in range(2):
            v, t = states[b, l].flatten() * 0.1, 0
            for name, (i, o) in shapes.items():
                a, t = v[t:t + 2 * i], t + 2 * i
                bb, t = v[t:t + 2 * o], t + 2 * o
                A = a.view(i, 2) if mode[0] == "r" else a.view(2, i).T
                B = bb.view(2, o) if mode[1] == "l" else bb.view(o, 2).T
                torch.testing.assert_close(lora[l][name][0][b], A)
                torch.testing.assert_close(lora[l][name][1][b], B)


def test_generated_lora_has_a_shape_for_every_module(llama):
    shine = Shine(llama, SMALL)
    lora = shine.generate_lora(torch.randint(0, 96, (2, 5)))
    assert sorted(lora) == [0, 1, 2]
    for l in range(3):
        for name, (i, o) in lora_shapes(llama).items():
            assert lora[l][name][0].shape == (2, i, 2) and lora[l][name][1].shape == (2, 2, o)


def test_fresh_shine_leaves_the_model_almost_unchanged(qwen):
    """The fresh generated update is s * x A B with LayerNorm-scale A, B: about s * sqrt(r * I) = 2% of |x| per
    element here (r = 8, I = 64). The next-token distributions barely move; without the scale they would."""
    shine = Shine(qwen, ShineConfig(meta_lora_rank=4))  # default r = 8 and s = 1e-3
    ctx, q = torch.randint(0, 128, (2, 20)), torch.randint(0, 128, (2, 10))
    base = torch.log_softmax(qwen(q).logits, -1)

    def adapted(scale):
        shine.config.lora_scale = scale
        with lora_applied(qwen, shine.generate_lora(ctx)):
            return torch.log_softmax(qwen(q).logits, -1)

    def kl_to_base(logp):  # nats per token
        return torch.sum(base.exp() * (base - logp), -1).mean().item()

    fresh, unscaled = adapted(1e-3), adapted(1e-1)
    assert 0 < kl_to_base(fresh) < 1e-3 and torch.equal(fresh.argmax(-1), base.argmax(-1))
    assert kl_to_base(unscaled) > 10 * kl_to_base(fresh) and not torch.equal(unscaled.argmax(-1), base.argmax(-1))


def test_generate_uses_each_rows_own_lora(qwen):
    shine = Shine(qwen, SMALL)
    with torch.no_grad():
        for p in shine.m2p.parameters():
            p.normal_(0, 0.5)
    shine.config.lora_scale = 1.0  # a strong adapter so that contexts change the answer
    ctx = torch.randint(0, 128, (2, 6))
    prompt = torch.randint(0, 128, (2, 4))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    both = shine.generate(ctx, None, prompt, torch.ones_like(prompt), **kw)
    for b in range(2):
        alone = shine.generate(ctx[b:b + 1], None, prompt[b:b + 1], torch.ones_like(prompt[b:b + 1]), **kw)
        assert torch.equal(both[b:b + 1], alone)
    # and without the KV cache, token by token, the same answer comes out
    lora = shine.generate_lora(ctx[:1])
    seq = prompt[:1]
    with lora_applied(qwen, lora):
        for _ in range(5):
            seq = torch.cat([seq, qwen(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(seq[:, 4:], both[:1])


def test_answer_loss_matches_hugging_face_loss(qwen):
    shine = Shine(qwen, SMALL)
    lora = shine.generate_lora(torch.randint(0, 128, (2, 6)))
    q = torch.randint(0, 128, (2, 8))
    labels = q.clone()
    labels[:, :5] = -100
    with lora_applied(qwen, lora):
        expected = qwen(q, labels=labels).loss
    torch.testing.assert_close(shine.answer_loss(lora, q, torch.ones_like(q), labels), expected)


def test_parameter_report_counts_what_is_trained(qwen):
    shine = Shine(qwen, SMALL)
    report = shine.parameter_report()
    trainable = sum(p.numel() for p in shine.parameters() if p.requires_grad)
    assert report["total"] == trainable
    L, H, R, D = 2, 64, 4, 1024
    assert report["meta_lora"] == L * R * D and report["memory"] == shine.num_memory * H
    assert report["eq45_estimate"] == pytest.approx((2 / L + 2 * R / H) * report["llm"])


def test_save_and_load_round_trip_and_refuse_another_backbone(qwen, tmp_path):
    shine = Shine(qwen, replace(SMALL, memory_norm="rms"))
    with torch.no_grad():
        for p in shine.hypernetwork_state_dict().values():
            p.normal_()
    shine.save_hypernetwork(tmp_path / "ckpt")
    loaded = Shine.from_pretrained(tiny_qwen3(), tmp_path / "ckpt")
    ctx = torch.randint(0, 128, (1, 5))
    torch.testing.assert_close(loaded.memory_states(ctx), shine.memory_states(ctx))
    assert loaded.config.memory_norm == "rms"
    with pytest.raises(ValueError, match="trained on"):
        Shine.from_pretrained(tiny_qwen3(layers=3), tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "shine_config.json"  # checkpoints from before memory_norm read raw states
    meta = json.loads(config.read_text())
    assert meta["shine"].pop("memory_norm") == "rms"
    config.write_text(json.dumps(meta))
    assert Shine.from_pretrained(tiny_qwen3(), tmp_path / "ckpt").config.memory_norm == "none"
    blob = (tmp_path / "ckpt" / "hypernetwork.safetensors").read_bytes()
    (tmp_path / "ckpt" / "hypernetwork.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        Shine.from_pretrained(tiny_qwen3(), tmp_path / "ckpt")


def test_peft_export_gives_the_same_logits(qwen, tmp_path):
    peft = pytest.importorskip("peft")
    lora = random_lora(qwen, batch=1)
    ids = torch.randint(0, 128, (1, 10))
    with lora_applied(qwen, lora):
        expected = qwen(ids).logits
    save_peft_adapter(qwen, lora, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(tiny_qwen3(), tmp_path / "adapter")
    torch.testing.assert_close(peft_model(ids).logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_reconstruction_loss_falls_when_training_the_hypernetwork():
    """A learning test: 4 random 12-token texts, reconstructed from a constant prompt under the LoRA generated from
    each text (eq. 10). Measured on CPU with the default scale s = 1e-3: 6.3 -> 0.23 in 150 Adam steps (lr 3e-3).
    Weights drawn with std 0.2 (not 0.02) so that the tiny tied head can express a peaked distribution at all."""
    torch.manual_seed(0)
    shine = Shine(tiny_qwen3(init_range=0.2), ShineConfig(lora_rank=4, meta_lora_rank=8, m2p_layers=2))
    texts = torch.randint(3, 128, (4, 12))
    ids = torch.cat([torch.full((4, 1), 1), texts], 1)  # token 1 stands in for "<RECON>"
    labels = torch.cat([torch.full((4, 1), -100), texts], 1)
    ones = torch.ones_like
    opt = torch.optim.Adam([p for p in shine.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(150):
        loss = shine(texts, ones(texts), ids, ones(ids), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0 and losses[-1] < 0.5, (losses[0], losses[-1])
    # the prompt is the same for all four texts: only the generated LoRA can tell them apart
    with torch.no_grad():
        swapped = shine(texts.roll(1, 0), ones(texts), ids, ones(ids), labels).item()
    assert swapped > 10 * losses[-1]


def test_activation_checkpointing_keeps_the_lora_hooks(qwen):
    """Recomputation in backward must see the same Meta-LoRA and generated LoRA as the forward pass."""
    torch.manual_seed(0)
    shine = Shine(qwen, SMALL)
    with torch.no_grad():
        for p in shine.meta_lora.parameters():
            p.normal_(0, 0.05)
    ctx, q = torch.randint(0, 128, (2, 7)), torch.randint(0, 128, (2, 6))
    labels = q.clone()
    labels[:, :2] = -100
    args = (ctx, torch.ones_like(ctx), q, torch.ones_like(q), labels)

    def grads():
        shine.zero_grad()
        loss = shine(*args)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in shine.hypernetwork_state_dict().items()}

    loss, expected = grads()
    shine.enable_activation_checkpointing()
    loss_ckpt, got = grads()
    torch.testing.assert_close(loss_ckpt, loss)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["aot_eager", GPU_INDUCTOR])
def test_compiled_layers_equal_eager_and_reuse_one_graph_for_every_adapter(backend):
    """Shine.compile_layers: the same loss and hypernetwork gradients as eager (activation checkpointing too);
    a new context, hence new LoRAs of the same shape, compiles nothing new; the bare model stays the bare model."""
    import copy
    from contextlib import nullcontext

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    device = "cuda" if backend == "inductor" else "cpu"
    eager = Shine(tiny_qwen3().to(device), SMALL)
    with torch.no_grad():
        for p in eager.hypernetwork_state_dict().values():
            p.normal_(0, 0.1)
    compiled = copy.deepcopy(eager)
    compiled.compile_layers(backend=backend)
    assert torch._dynamo.config.recompile_limit >= 64  # ~10 graphs a layer; past the limit dynamo runs eagerly

    def loss_and_grads(shine, seed):
        g = torch.Generator().manual_seed(seed)
        ctx, ids = (torch.randint(0, 128, (2, n), generator=g).to(device) for n in (10, 7))
        shine.zero_grad()
        loss = shine(ctx, torch.ones_like(ctx), ids, torch.ones_like(ids), ids.clone())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in shine.hypernetwork_state_dict().items()}

    def assert_same(seed):
        (loss, grads), (loss_c, grads_c) = loss_and_grads(eager, seed), loss_and_grads(compiled, seed)
        torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=1e-5)
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], atol=1e-5, rtol=1e-3, msg=name)

    assert_same(0)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    assert_same(1)
    assert counters["stats"]["unique_graphs"] == graphs  # another context's LoRAs: the same graphs
    for shine in (eager, compiled):
        shine.enable_activation_checkpointing()
    assert_same(2)

    @torch.no_grad()
    def logits(shine, lora):
        with lora_applied(shine.llm, lora) if lora else nullcontext():
            return shine.llm(ids).logits

    ctx, ids = (torch.randint(0, 128, (2, n), device=device) for n in (10, 7))
    with torch.no_grad():
        lora = eager.generate_lora(ctx)
    assert (logits(eager, lora) - logits(eager, None)).abs().max() > 1e-3
    for lora_or_none in (lora, None, lora):  # LoRA hooks added per block, not kept, would be skipped the 2nd time
        torch.testing.assert_close(logits(compiled, lora_or_none), logits(eager, lora_or_none))
    ctx, ids = (torch.randint(0, 128, (2, 20), device=device) for _ in range(2))  # > FUSED_LORA_TOKENS, no grad:
    with torch.no_grad():  # the hooks' matmul-and-add path, for the shared Meta-LoRA and for a LoRA per row
        torch.testing.assert_close(compiled.memory_states(ctx), eager.memory_states(ctx), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(compiled, lora), logits(eager, lora))
    with pytest.raises(RuntimeError, match="before enable_activation_checkpointing"):
        compiled.compile_layers(backend=backend)
    torch._dynamo.reset()
