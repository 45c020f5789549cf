"""flops.py: the paper's Qwen3-8B numbers by hand (App. B.5, B.6, C.2) and the formulas against FLOPs measured
on the real modules with torch.utils.flop_counter.FlopCounterMode.

Measurement notes. FlopCounterMode counts matmuls only (mm, addmm without its bias add, bmm, sdpa), like the
formulas. On CPU the default sdpa kernel (`_scaled_dot_product_flash_attention_for_cpu`) has no FLOP formula
and counts 0, so we force the math backend, whose two bmm give 4*N_q*N_k*d per head (the full matrix even when
causal). The one matmul the formulas leave out is Hugging Face's RoPE table, inv_freq (d/2, 1) @ positions
(1, T), 2 * (d/2) * T = d*T FLOPs per row of position ids, once per forward: we add it and ask for equality.
"""
import json
from contextlib import nullcontext

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import flops
import shine
from conftest import tiny_llama, tiny_qwen3

QWEN3_8B = flops.PRESETS["qwen3-8b"]


# shine's LoRA hooks add into the linears' outputs in place; FlopCounterMode has formulas for addmm and baddbmm but
# not for their in-place forms, which do the same matmuls
IN_PLACE = {torch.ops.aten.addmm_: flop_counter.addmm_flop.__wrapped__,
            torch.ops.aten.baddbmm_: flop_counter.baddbmm_flop.__wrapped__}


def measure(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=IN_PLACE) as counter:
        fn()
    return counter.get_total_flops()


def qwen3_8b_on_meta():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=151_936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
    with torch.device("meta"):  # shapes only: no memory, no weights
        return Qwen3ForCausalLM(config)


# ----------------------------------------------------------------------------- the paper's numbers, by hand
def test_qwen3_8b_D_M_and_parameter_count():
    # q (4096 -> 4096), k and v (4096 -> 1024), o (4096 -> 4096), gate and up (4096 -> 12288), down (12288 -> 4096)
    D = (4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 12288)
    assert D == 75_776 == QWEN3_8B.D
    assert 8 * 75_776 == 148 * 4096  # so M = ceil(r D / H) = 148 exactly, = 37/2 r (App. B.5.3)
    assert flops.memory_tokens(QWEN3_8B, 8) == 148
    llm = qwen3_8b_on_meta()
    assert flops.Shape.from_config(llm.config) == QWEN3_8B
    assert QWEN3_8B.params() == sum(p.numel() for p in llm.parameters()) == 8_190_735_360


def test_eqs_30_to_32_at_context_1150():
    L, H, Lp, M, C = 36, 4096, 4, 148, 1150
    eq30 = 36 * (23 * 1298 * 4096**2 + 4 * 1298**2 * 4096)  # C + M = 1298
    eq31 = 4 / 2 * 148 * (20 * 36 * 4096**2 + 4 * 36**2 * 4096) + 4 / 2 * 36 * (20 * 148 * 4096**2 + 4 * 148**2 * 4096)
    eq32 = 36 * 4096 * (23 * 1298 * 4096 + 4 * 1298**2 + 20 * 148 * 4 * 4096 + 2 * 36 * 4 * 148 + 2 * 4 * 148**2)
    assert eq30 == 19_024_950_067_200 and eq31 == 7_183_244_722_176 and eq30 + eq31 == eq32
    # eq. 32 as printed ends in 2 L M^2 where eqs. 30 + 31 give 2 L' M^2
    printed = L * H * (23 * (C + M) * H + 4 * (C + M) ** 2 + 20 * M * Lp * H + 2 * L * Lp * M + 2 * L * M**2)
    assert printed != eq32 and abs(printed / eq32 - 1) < 0.01
    out = flops.shine_flops(QWEN3_8B, C, rank=8, m2p_layers=4, meta_rank=0, m2p_mlp="swiglu", full_last_mlp=True)
    assert out["llm/attn_proj"] + out["llm/attn"] + out["llm/mlp"] == eq30
    assert out["m2p/attn_proj"] + out["m2p/attn"] + out["m2p/mlp"] == eq31
    assert out["total"] == eq32 == 26_208_194_789_376
    # our model: + Meta-LoRA (rank 128 on the 7 linears, not in eq. 30), GELU MLP of width 2H (8NH^2, not 12NH^2)
    # and the last layer's MLP (with its Meta-LoRA) on the 148 memory rows only, not on the C context rows
    ours = flops.shine_flops(QWEN3_8B, C)
    unread_mlp, unread_meta = 3 * 2 * C * 4096 * 12288, 2 * C * 128 * 3 * (4096 + 12288)
    assert ours["meta_lora"] == 36 * 2 * 1298 * 128 * 75_776 - unread_meta
    assert ours["m2p/mlp"] == 4 * 2 * 2 * (36 * 148) * 4096 * 8192
    assert ours["total"] == eq32 + ours["meta_lora"] - 4 * 4 * (36 * 148) * 4096**2 - unread_mlp


def test_llm_forward_and_generation_eqs_22_27_36_39():
    L, H, V, I, C = 36, 4096, 151_936, 200, 1150
    assert flops.llm_flops(QWEN3_8B, I)["total"] == L * (23 * I * H**2 + 4 * I**2 * H) + 2 * H * V  # eq. 22
    assert flops.llm_flops(QWEN3_8B, 1, keys=I)["total"] == L * (23 * H**2 + 4 * I * H) + 2 * H * V  # eq. 27
    gen = lambda method, kv, **kw: flops.generation_flops(QWEN3_8B, method, I, C, kv, **kw)["total"]
    for method in ("shine", "sft", "naive"):
        assert gen(method, False) == L * (23 * I * H**2 + 4 * I**2 * H) + 2 * H * V  # eq. 36
        assert gen(method, True) == L * (23 * H**2 + 4 * I * H) + 2 * H * V  # eq. 37
    assert gen("in-context", False) == L * (23 * (I + C) * H**2 + 4 * (I + C) ** 2 * H) + 2 * H * V  # eq. 38
    assert gen("in-context", True) == L * (23 * H**2 + 4 * (I + C) * H) + 2 * H * V  # eq. 39
    # our generate() keeps the LoRA as hooks: 2 r (in + out) per token and linear on top
    hooks = flops.generation_flops(QWEN3_8B, "shine", I, C, True, rank=8, merged=False)
    assert hooks["lora/unmerged"] == 36 * 2 * 8 * 75_776 and hooks["total"] == gen("shine", True) + 36 * 2 * 8 * 75_776
    assert "lora/unmerged" not in flops.generation_flops(QWEN3_8B, "naive", I, C, True, merged=False)


def test_sft_eq_35():
    L, H, V, C, T = 36, 4096, 151_936, 1150, 50  # T: 10 epochs x 5 conversations (Table 1)
    eq35 = 3 * T * (L * (23 * C * H**2 + 4 * C**2 * H) + 2 * C * H * V)
    assert flops.sft_flops(QWEN3_8B, C, steps=T)["total"] == eq35
    with_lora = flops.sft_flops(QWEN3_8B, C, steps=T, rank=8)
    assert with_lora["llm/lora"] == 3 * T * 36 * 2 * C * 8 * 75_776


def test_peak_memory_eqs_41_to_44():
    L, H, I, C = 36, 4096, 200, 1150
    mem = lambda method, kv, att="efficient": flops.peak_memory(QWEN3_8B, method, I, C, kv, att)["total"]
    assert mem("shine", False) == 4 * L * I * H  # eq. 41
    assert mem("in-context", False, "standard") == 4 * L * (I + C) * H + L * (I + C) ** 2  # eq. 42
    assert mem("naive", True) == L * I * H / 2  # eq. 44
    assert mem("in-context", True) == L * (I + C) * H / 2
    assert flops.compare(QWEN3_8B, C, I)["peak extra GiB bf16, KV cache"]["sft"] == 2 * L * I * H / 2 / 2**30


def test_up_to_90_percent_claim():
    L, H, M = 36, 4096, 148
    default = flops.m2p_saving(QWEN3_8B, 8)
    # per block pair: full attention 2 * 4 (LM)^2 H; column 4 M L^2 H + row 4 L M^2 H
    assert default["attn"] == pytest.approx(1 - (L + M) / (2 * L * M)) and default["attn"] > 0.98
    # whole block, ours: 16 LMH^2 (projections 8, MLP 8) + attention
    assert default["m2p"] == pytest.approx(1 - (16 * H + 2 * (L + M)) / (16 * H + 4 * L * M))
    assert 0.24 < default["m2p"] < 0.25
    paper = flops.m2p_saving(QWEN3_8B, 8, mlp="swiglu")
    assert paper["m2p"] == pytest.approx(1 - (20 * H + 2 * (L + M)) / (20 * H + 4 * L * M))
    assert all(flops.m2p_saving(QWEN3_8B, r)["attn"] > 0.9 for r in (1, 2, 4, 8, 64))
    # the whole M2P reaches 90% only from r = 258 (ours) or 322 (the paper's SwiGLU M2P), as the docstring says
    assert flops.m2p_saving(QWEN3_8B, 257)["m2p"] < 0.9 <= flops.m2p_saving(QWEN3_8B, 258)["m2p"]
    paper_m2p = lambda r: flops.m2p_saving(QWEN3_8B, r, mlp="swiglu")["m2p"]
    assert paper_m2p(321) < 0.9 <= paper_m2p(322)


def test_paper_parameter_estimate_eq_45():
    P = 8_190_735_360
    assert flops.paper_params(QWEN3_8B) == pytest.approx((4 / 36 + 2 * 128 / 4096) * P)
    ours = flops.hypernetwork_params(QWEN3_8B)
    assert ours["meta_lora"] == 36 * 128 * 75_776  # R (in + out) per linear
    assert ours["memory"] == 148 * 4096 and ours["m2p/positions"] == (36 + 148) * 4096


# ----------------------------------------------------------------------------- measured on the real modules
@pytest.mark.parametrize("make", [tiny_qwen3, tiny_llama])
def test_measured_llm_forward_decode_and_training(make):
    llm = make()
    s, B, T = flops.Shape.from_config(llm.config), 2, 10
    ids = torch.randint(0, s.vocab, (B, T))
    rope = s.head_dim * T  # position ids (1, T), made by HF
    assert measure(lambda: llm(ids)) == B * flops.llm_flops(s, T, logits=T)["total"] + rope
    cache = llm(ids, use_cache=True).past_key_values
    step = lambda: llm(ids[:, :1], past_key_values=cache, use_cache=True, logits_to_keep=1)
    assert measure(step) == B * flops.llm_flops(s, 1, keys=T + 1)["total"] + s.head_dim  # eq. 25
    lora = {l: {n: (torch.randn(i, 8), torch.randn(8, o)) for n, (i, o) in s.linears().items()}
            for l in range(s.layers)}
    with shine.lora_applied(llm, lora):  # unmerged LoRA hooks; the step above left one more key in the cache
        assert measure(step) == B * flops.llm_flops(s, 1, keys=T + 2, lora_rank=8)["total"] + s.head_dim
    llm.requires_grad_(True)  # full fine-tuning: backward = 2x forward exactly (the RoPE table has no backward)
    train_step = lambda: llm(ids, labels=ids).loss.backward()
    assert measure(train_step) == 3 * B * flops.llm_flops(s, T, logits=T)["total"] + rope


@pytest.mark.parametrize("make, m2p_layers, first", [(tiny_qwen3, 4, "column"), (tiny_llama, 3, "row")])
def test_measured_shine_memory_states_m2p_and_parameters(make, m2p_layers, first):
    llm = make()
    s, B, C = flops.Shape.from_config(llm.config), 2, 10
    model = shine.Shine(llm, shine.ShineConfig(m2p_layers=m2p_layers, m2p_first=first))
    M = model.num_memory
    assert M == flops.memory_tokens(s, 8) == shine.num_memory_tokens(8, model.shapes, s.hidden)
    ids = torch.randint(0, s.vocab, (B, C))
    expected = flops.shine_flops(s, C, m2p_layers=0)["total"]  # memory extraction + Meta-LoRA, no LM head
    rope = B * s.head_dim * (C + M)  # memory_states passes position ids (B, C + M)
    assert measure(lambda: model.memory_states(ids, torch.ones_like(ids))) == B * expected + rope
    states = torch.randn(B, s.layers, M, s.hidden)
    m2p = flops.m2p_flops(s.layers, M, s.hidden, m2p_layers, first=first)
    assert measure(lambda: model.m2p(states)) == B * m2p["total"]
    if m2p_layers % 2:  # odd L': the extra block's axis decides which of L^2 M and L M^2 counts twice
        assert m2p["total"] != flops.m2p_flops(s.layers, M, s.hidden, m2p_layers, first="column")["total"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert flops.hypernetwork_params(s, m2p_layers=m2p_layers)["total"] == trainable
    assert s.params() == sum(p.numel() for p in llm.parameters())
    assert flops.paper_params(s, m2p_layers=m2p_layers) == pytest.approx(model.parameter_report()["eq45_estimate"])


def test_measured_qwen3_8b_on_meta_device():
    """Full-size shapes, no weights: one decoder layer, SHINE's memory extraction layer by layer with the
    Meta-LoRA hooks (HF's mask code reads values, so the whole decoder cannot run on meta), and the M2P."""
    llm, C = qwen3_8b_on_meta(), 1150
    model = shine.Shine(llm)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == flops.hypernetwork_params(QWEN3_8B)["total"]
    x = torch.zeros(1, C + 148, 4096, device="meta")
    rope = llm.model.rotary_emb(x, torch.arange(C + 148, device="meta")[None])

    def extract(last_mlp_rows=None):  # None: the last MLP on every row
        h, last_mlp = x, llm.model.layers[-1].mlp
        with shine.lora_applied(llm, model.meta_lora.as_lora()):
            with shine._on_last_rows(last_mlp, last_mlp_rows) if last_mlp_rows else nullcontext():
                for layer in llm.model.layers:
                    out = layer(h, position_embeddings=rope, attention_mask=None)
                    h = out[0] if isinstance(out, tuple) else out

    plain = flops.llm_flops(QWEN3_8B, C + 148, logits=0)["total"]
    assert measure(lambda: llm.model.layers[0](x, position_embeddings=rope, attention_mask=None)) == plain // 36
    assert measure(extract) == flops.shine_flops(QWEN3_8B, C, m2p_layers=0, full_last_mlp=True)["total"]
    assert measure(lambda: extract(148)) == flops.shine_flops(QWEN3_8B, C, m2p_layers=0)["total"]  # as memory_states
    states = torch.zeros(1, 36, 148, 4096, device="meta")
    assert measure(lambda: model.m2p(states)) == flops.m2p_flops(36, 148, 4096, 4)["total"]


# ----------------------------------------------------------------------------- CLI
def test_cli_preset_config_json_and_sweep(tmp_path, capsys):
    flops.main(["--model", "qwen3-8b", "--context", "1150", "--question", "200"])
    out = capsys.readouterr().out
    assert "D = 75,776  M = 148" in out and "98.27%" in out and "24.12%" in out
    amortizable = flops.compare(QWEN3_8B, 1150, 200)["amortizable TFLOPs"]
    assert amortizable["naive"] == amortizable["in-context"] == 0 and amortizable["sft"] > 100 * amortizable["shine"]
    config = tiny_llama().config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    for model in (str(tmp_path / "config.json"), str(tmp_path)):
        flops.main(["--model", model, "--sweep", "context", "--paper"])
        out = capsys.readouterr().out
        assert "D = 960" in out and all(f"C = {c} " in out for c in flops.CONTEXTS)  # D = 4(48+48) + 3(48+144)
