"""results/render.py tables, the SHINE-135M pipeline's helpers (benchmarks/) and its driver end to end on a tiny
backbone: held-out data, per-example reconstruction losses, bf16 export, split / unpack of checkpoints."""
import gzip
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_qwen3

import data
import train
from shine import Shine, ShineConfig, lora_shapes, num_memory_tokens
from test_data import chat_tokenizer


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load_module("render", "results/render.py")
curves = load_module("recon_curves", "benchmarks/recon_curves.py")
heldout = load_module("make_heldout", "benchmarks/make_heldout.py")
helpers = load_module("shine_135m", "benchmarks/shine_135m.py")
probe = load_module("channel_probe", "benchmarks/channel_probe.py")


# ----------------------------------------------------------------------------- render.py
def bench(n, **methods):
    results = {m: {"f1": f1, "em": em, "amortizable_s": a, "generation_s": g, "f1_per_turn": [f1]}
               for m, (f1, em, a, g) in methods.items()}
    return {"n": n, "results": results, "config": {"batch_size": 64}, "machine": {"gpu": "NVIDIA H100 80GB HBM3"}}


def write_results(directory):
    out = directory / "shine-135m"
    out.mkdir(parents=True)
    files = {
        "squad": bench(4, naive=(22.04, 10.0, 0, 1), **{"in-context": (86.8, 70.26, 0, 2)}, shine=(63.6, 50.0, 0.3, 1),
                       **{"shine-other": (12.5, 0.0, 0.3, 1)}),
        "hotpotqa": bench(103, naive=(26.9, 20.0, 0, 1), shine=(59.0, 45.0, 0.3, 1)),
        "coqa-heldout": bench(50, naive=(23.2, 10.0, 0.0, 11.0), sft=(33.0, 12.5, 29.3, 11.0), shine=(55.6, 40.0, 0.3, 11.0)),
        "recon_curves": {"config": {"buckets": [64, 128, 256]}, "summary": {"final": {
            "recon": {"n": [3, 2], "ppl": {"median": [1.5, 2.25], "p10": [1.1, 1.2], "p90": [3.0, 4.0]}},
            "comp": {"n": [3, 2], "ppl": {"median": [4.0, None], "p10": [2.0, None], "p90": [9.0, None]}}}}},
        "training": {"parameters": {"memory": 10, "meta_lora": 2000, "m2p": 30000, "total": 32010}, "bytes": 64020,
                     "stages": [{"stage": "pretrain", "steps": 1000, "batch": 16, "lr": 0.001, "minutes": 6.54,
                                 "first_loss": 2.5, "last_loss": 0.8, "val_recon_loss": 1.1, "val_comp_loss": 1.6}]},
    }
    answers = {"shine": ["a", "b", "c", "d"], "shine-other": ["a", "x", "y", "d"]}  # 2 of 4 identical
    for method, answered in answers.items():
        files["squad"]["results"][method]["predictions"] = [{"answer": x} for x in answered]
    for name, report in files.items():
        (out / f"{name}.json").write_text(json.dumps(report))
    speed = {"device": "NVIDIA H100 80GB HBM3", "shape": "qwen3-8b", "lengths": {"context": 1150}, "gen_wall_s": 3.0,
             "gen": {"c1150_b1": {"ms": 12.5, "contexts_s": 81.0, "tflops": 123.4, "peak_gib": 17.5}},
             "train": {"plain": {"ms": 1000.0, "tok_s": 2300.0, "mfu": 0.412, "peak_gib": 40.0}, "ckpt": {"error": "OOM"}}}
    (directory / "speed_h100.json").write_text(json.dumps(speed))
    fsdp = {"device": "NVIDIA H100 80GB HBM3", "shape": "qwen3-8b", "sharded": "hypernetwork", "note": "before X",
            "train": {"no_ckpt": {"ms": 1200.0, "tok_s": 1900.0, "mfu": 0.108, "scaling_efficiency": 0.41}}}
    (directory / "speed_h100x2_fsdp.json").write_text(json.dumps(fsdp))
    runs = [{"run": "runs/shapes/qwen3-8b/pretrain", "steps": 30, "timed_steps": 27, "model": "benchmarks/shapes/qwen3-8b",
             "stage": "pretrain", "batch": 1, "fsdp": True, "gpus": 2, "ms": 676.1, "tok_s": 2921.4, "tflops": 171.66,
             "mfu": 0.1736, "peak_gib": 46.96},
            {"run": "runs/a", "steps": 9, "timed_steps": 6, "model": "benchmarks/shapes/qwen3-8b", "stage": "pretrain",
             "batch": 1, "grad_accum": 8, "fsdp": False, "gpus": 1, "ms": 6437.0, "tok_s": 2606.0, "tflops": 151.2,
             "mfu": 0.153, "peak_gib": 50.3}]
    (directory / "train_h100x2.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "runs": runs}))


def test_tables_from_results(tmp_path):
    write_results(tmp_path)
    lines = render.render(tmp_path).splitlines()
    expected = [
        "| method | SQuAD (n=4) | HotpotQA (n=103) |",
        "| Naive | 22.0 / 10.0 | 26.9 / 20.0 |",
        "| In-context | 86.8 / 70.3 | – |",
        "| SHINE | 63.6 / 50.0 | 59.0 / 45.0 |",
        "| SHINE − naive (F1) | +41.6 | +32.1 |",
        "| bench | own context F1 / EM | another context F1 / EM | F1 own − other | identical answers |",
        "| SQuAD (n=4) | 63.6 / 50.0 | 12.5 / 0.0 | +51.1 | 50% |",
        "| method | F1 | EM | amortizable s | generation s |",
        "| Naive | 23.2 | 10.0 | 0.000 | 11.000 |",
        "| SFT | 33.0 | 12.5 | 29.300 | 11.000 |",
        "| SHINE | 55.6 | 40.0 | 0.300 | 11.000 |",
        "| model | task | 64–128 tokens (n=3) | 128–256 tokens (n=2) |",
        "| final | reconstruction | 1.50 [1.10, 3.00] | 2.25 [1.20, 4.00] |",
        "| final | completion | 4.00 [2.00, 9.00] | – |",
        "| pretraining | 1000 | 16 | 0.001 | 6.5 | 2.500 → 0.800 | recon 1.100, comp 1.600 |",
        "**Speed** (`speed_h100.json`: NVIDIA H100 80GB HBM3, shape qwen3-8b)",
        "| gen/c1150_b1 | 12.50 | 81 contexts/s | 123.4 | – | – | 17.5 |",
        "| train/plain | 1000.00 | 2300 tok/s | – | 41.2% | – | 40 |",
        "| train/no_ckpt | 1200.00 | 1900 tok/s per GPU, scaling 41% | – | 10.8% | – | – |",
        "**train.py** (`train_h100x2.json`: NVIDIA H100 80GB HBM3; random weights, bundled data, medians)",
        "| qwen3-8b | pretrain | 2 (FSDP) | 1 | 27 of 30 | 676 | 2921 | 171.7 | 17.4% | 46.96 |",
        "| qwen3-8b | pretrain | 1 | 1 × 8 | 6 of 9 | 6437 | 2606 | 151.2 | 15.3% | 50.3 |",
        "**Speed** (`speed_h100x2_fsdp.json`: NVIDIA H100 80GB HBM3, shape qwen3-8b; FSDP2 shards the hypernetwork)",
        "_before X._",
    ]
    for line in expected:
        assert line in lines, line
    assert "seconds per conversation on NVIDIA H100 80GB HBM3, batch 64" in lines[lines.index("| method | F1 | EM | amortizable s | generation s |") - 2]
    assert sum(line.startswith("| train/") for line in lines) == 2  # the failed measurement has no row
    assert not any(line.startswith("| SHINE, another") for line in lines)  # the control has its own table, not a row
    assert "one run on NVIDIA H100 80GB HBM3, bf16)." in lines[lines.index(expected[5]) - 2]
    assert "32,010 trained parameters (10 memory embeddings, 2,000 Meta-LoRA, 30,000 M2P), 0.1 MB in bf16." in render.render(tmp_path)


def test_readme_is_rewritten_between_markers_only(tmp_path):
    write_results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# shine\nintro\n{render.START}\nold table\n{render.END}\nmore text\n")
    argv = ["--results", str(tmp_path), "--readme", str(readme)]
    assert render.main(argv + ["--check"]) == 1  # stale
    assert render.main(argv) == 0
    text = readme.read_text()
    assert text.startswith("# shine\nintro\n") and text.endswith(f"{render.END}\nmore text\n")
    assert "old table" not in text and "| SHINE | 55.6 | 40.0 | 0.300 | 11.000 |" in text
    assert render.main(argv + ["--check"]) == 0 and render.main(argv) == 0 and readme.read_text() == text
    readme.write_text("no markers here\n")
    assert render.update_readme(readme, "x") is None and render.main(argv) == 0
    assert readme.read_text() == "no markers here\n"  # left alone; the tables are printed instead


def test_table1_names_each_rows_machine_when_methods_ran_on_several():
    report = bench(50, naive=(23.2, 10.0, 0.0, 11.0), shine=(55.6, 40.0, 0.3, 2.5))
    report["results"]["shine"]["machine"] = {"cpu": "Intel Xeon", "cpu_count": 2, "gpu": None}
    lines = render.table1(report).splitlines()
    assert "seconds per conversation on the machine of each row" in lines[0]
    assert "| Naive | 23.2 | 10.0 | 0.000 | 11.000 | NVIDIA H100 80GB HBM3 |" in lines  # the report's machine
    assert "| SHINE | 55.6 | 40.0 | 0.300 | 2.500 | Intel Xeon (2 cores) |" in lines


def probe_run(channels: list[float], every: int = 100, **config) -> dict:
    """A channel_probe.py report whose channel at step every * (i + 1) is channels[i] (own 3.9, none 4.3)."""
    curve = [{"step": every * (i + 1), "own": 3.9, "other": 3.9 + c, "none": 4.3, "channel": c}
             for i, c in enumerate(channels)]
    return {"config": {"lr": 5e-4, "batch_size": 32, "lora_rank": 8, "lora_scale": 2.7e-4, "seed": 0, **config}, "curve": curve}


def test_channel_tables_mark_every_100_steps_and_list_the_levers():
    probe = {"note": "one H100", "runs": {"2.7e-4": probe_run([0.01, 0.05]), "2.7e-3": probe_run([0.0, 0.02, 0.03])},
             "levers": {"note": "one H200", "compiled_pretrain_step": {"device": "NVIDIA H200", "by_batch": {
                 "32": {"ms": 247}, "128": {"ms": 601}}}, "runs": {
                 "batch 128": {"setting": "alone", **probe_run([0.04, 0.136], every=94, batch_size=128, lr=1e-3)}}}}
    scales, levers = render.channel_tables(probe)
    lines = scales.splitlines()
    assert "| s | lr | step 100 | step 200 | last step | own / other / none |" in lines  # steps both runs reached
    assert "| 2.7e-4 | 0.0005 | +0.010 | +0.050 | 200 | 3.900 / 3.950 / 4.300 |" in lines
    assert "| 2.7e-3 | 0.0005 | +0.000 | +0.020 | 300 | 3.900 / 3.930 / 4.300 |" in lines
    lines = levers.splitlines()
    assert "(NVIDIA H200): 247 ms at batch 32, 601 ms at batch 128." in lines[0]
    assert lines[2] == "_one H200._"
    assert "| batch 128 | 128 | 0.001 | 8 | 2.7e-4 | 0 | alone | 188 | +0.136 | 3.900 / 4.036 / 4.300 |" in lines


def test_no_results_renders_a_notice(tmp_path):
    assert render.render(tmp_path).startswith("_No results yet")


# ----------------------------------------------------------------------------- recon_curves.py
def test_buckets_and_percentiles_by_hand():
    edges = [10, 50, 100]
    assert [curves.bucket_of(n, edges) for n in (9, 10, 49, 50, 100, 101)] == [None, 0, 0, 1, 1, None]
    s = curves.summarize([10, 20, 30, 40, 100], [1.0, 2.0, 3.0, 4.0, 5.0], edges)
    assert s["n"] == [4, 1]
    assert s["loss"]["median"] == [2.5, 5.0]
    assert s["loss"]["p10"] == pytest.approx([1.3, 5.0]) and s["loss"]["p90"] == pytest.approx([3.7, 5.0])
    assert s["ppl"]["median"][0] == pytest.approx((math.e ** 2 + math.e ** 3) / 2)  # numpy's midpoint, in PPL space


def test_chunks_are_consecutive_slices_within_the_buckets():
    articles = [list(range(k * 1000, k * 1000 + n)) for k, n in enumerate((5000, 300, 4000))]
    edges = [8, 16, 64, 256]
    picked = curves.chunks(articles, edges, per_bucket=5, seed=0)
    assert picked == curves.chunks(articles, edges, per_bucket=5, seed=0)  # seeded
    counts = [sum(curves.bucket_of(len(c), edges) == b for c in picked) for b in range(3)]
    assert counts == [5, 5, 5]
    for c in picked:  # a contiguous run of one article
        assert c == list(range(c[0], c[0] + len(c))) and c[0] // 1000 == c[-1] // 1000


def test_control_pairs_each_answer_with_a_neighbours_context():
    examples = [{"context": [i] * (i + 1), "input_ids": [10 + i], "labels": [10 + i]} for i in range(3)]
    other = curves.with_other_contexts(examples)
    assert [e["context"] for e in other] == [[1, 1], [2, 2, 2], [0]]
    assert [e["input_ids"] for e in other] == [[10], [11], [12]] and examples[0]["context"] == [0]


def test_per_example_losses_match_one_example_at_a_time():
    """Batched, left/right-padded per-example losses equal Shine.forward on each example alone; "base" equals the
    Hugging Face loss of the bare backbone (the zero LoRA adds nothing)."""
    tok = chat_tokenizer("qwen3")
    llm = tiny_qwen3(vocab=len(tok), init_range=0.2)
    torch.manual_seed(0)
    shine = Shine(llm, ShineConfig(lora_rank=2, meta_lora_rank=4, m2p_layers=1, lora_scale=0.3)).eval()
    for p in shine.hypernetwork_state_dict().values():  # a trained-looking hypernetwork, not the no-op init
        torch.nn.init.normal_(p, std=0.3)
    texts = ["The Rhine begins in the Swiss canton of Graubunden.", "Oxygen has the symbol O.",
             "Kenya is a country in East Africa with Nairobi as its capital and largest city."]
    eot = train.eot_id(tok)
    for prob in curves.TASKS.values():
        examples = [train.pretrain_example(tok, [tok(t).input_ids], random.Random(i), eot, prob) for i, t in enumerate(texts)]
        batched = curves.example_losses(shine, examples, batch_size=3, pad_id=tok.pad_token_id)
        alone = [shine(**train.collate([e], tok.pad_token_id)).item() for e in examples]
        assert batched == pytest.approx(alone, rel=1e-5)
        base = curves.example_losses(shine, examples, 2, tok.pad_token_id, base=True)
        hf = [llm(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss.item() for e in examples]
        assert base == pytest.approx(hf, rel=1e-5) and all(abs(a - b) > 1e-3 for a, b in zip(base, alone))


# ----------------------------------------------------------------------------- channel_probe.py
def test_channel_is_zero_when_every_text_is_the_same_and_not_otherwise():
    """other - own measures what a LoRA knows about its own text: with identical texts the neighbour's LoRA IS the
    text's own (exactly zero); with different texts and a non-trivial hypernetwork it is not; "none" ignores the
    hypernetwork altogether."""
    tok = chat_tokenizer("qwen3")
    torch.manual_seed(0)
    shine = Shine(tiny_qwen3(vocab=len(tok), init_range=0.2),
                  ShineConfig(lora_rank=2, meta_lora_rank=4, m2p_layers=1, lora_scale=0.3)).eval()
    for p in shine.hypernetwork_state_dict().values():
        torch.nn.init.normal_(p, std=0.3)
    texts = ["The Rhine begins in the Swiss canton of Graubunden.", "Oxygen has the symbol O.",
             "Kenya is a country in East Africa with Nairobi as its capital."]
    eot = train.eot_id(tok)
    examples = lambda ts: [train.pretrain_example(tok, [tok(t).input_ids], random.Random(0), eot, 1.0) for t in ts]
    same = probe.channel(shine, examples([texts[0]] * 3), batch_size=2, pad_id=tok.pad_token_id)
    assert same["channel"] == 0.0 and same["own"] == same["other"] != same["none"]
    different = probe.channel(shine, examples(texts), batch_size=2, pad_id=tok.pad_token_id)
    assert abs(different["channel"]) > 1e-3
    for p in shine.hypernetwork_state_dict().values():
        torch.nn.init.normal_(p, std=0.1)
    assert probe.channel(shine, examples(texts), 2, tok.pad_token_id)["none"] == pytest.approx(different["none"])


def test_memory_spread_is_zero_for_identical_contexts_and_matches_a_direct_computation(qwen):
    shine = Shine(qwen, ShineConfig(lora_rank=2, meta_lora_rank=4, m2p_layers=1)).eval()
    ids = torch.randint(3, 128, (3, 10))
    mask = torch.ones_like(ids)
    same = probe.memory_spread(shine, ids[:1].repeat(3, 1), mask)
    assert len(same) == qwen.config.num_hidden_layers and all(r["across_contexts"] < 1e-6 for r in same)
    with pytest.raises(ValueError, match="at least 2 contexts"):
        probe.memory_spread(shine, ids[:1], mask[:1])
    spread = probe.memory_spread(shine, ids, mask)
    states = shine.memory_states(ids, mask).detach()
    for l, r in enumerate(spread):
        x = states[:, l]
        assert r["rms"] == pytest.approx(x.pow(2).mean().sqrt().item(), rel=1e-5)
        assert r["max_abs"] == pytest.approx(x.abs().max().item(), rel=1e-6)
        assert r["across_contexts"] * r["rms"] == pytest.approx((x - x.mean(0)).pow(2).mean().sqrt().item(), rel=1e-5)
        assert r["across_contexts"] > 0


def test_text_chunks_are_consecutive_and_keep_long_enough_tails():
    class Words:  # one token per word
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [int(w) for w in text.split()]}
    texts = [" ".join(map(str, range(10))), " ".join(map(str, range(100, 105)))]
    assert probe.text_chunks(Words(), texts, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [100, 101, 102, 103], [104]]
    assert probe.text_chunks(Words(), texts, 8) == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9], [100, 101, 102, 103, 104]]
    assert probe.text_chunks(Words(), texts, 4, limit=2) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_probe_runs_end_to_end_and_writes_its_curve(tiny_backbone_dir, tmp_path):
    out = tmp_path / "probe.json"
    report = probe.main(["--model", str(tiny_backbone_dir), "--steps", "3", "--eval-every", "2", "--val", "4",
                         "--batch-size", "2", "--ctx", "24", "--meta-lora-rank", "4", "--lora-rank", "3", "--lr", "1e-3",
                         "--out", str(out)])
    assert [p["step"] for p in report["curve"]] == [0, 2, 3]
    llm = data.load_backbone(str(tiny_backbone_dir))[0]  # M = ceil(r D / H) for the rank asked for
    shapes, hidden = lora_shapes(llm), llm.config.hidden_size
    assert report["memory_tokens"] == num_memory_tokens(3, shapes, hidden) > num_memory_tokens(2, shapes, hidden)
    assert json.loads(out.read_text())["curve"] == report["curve"]
    for point in report["curve"]:
        assert all(math.isfinite(point[k]) for k in ("own", "other", "none", "channel"))
        assert point["channel"] == pytest.approx(point["other"] - point["own"])
    assert report["curve"][0]["train_loss"] is None and report["curve"][-1]["train_loss"] > 0


# ----------------------------------------------------------------------------- make_heldout.py
@pytest.fixture
def small_data_dir(tmp_path):
    """The bundled real samples under the names make_heldout.py looks for (full files live in ../shared/data)."""
    d = tmp_path / "data"
    d.mkdir()
    for domain in heldout.DOMAINS:
        shutil.copyfile(data.BUNDLED[f"squadshifts-{domain}"], d / f"squadshifts_{domain}.json.gz")
    shutil.copyfile(data.BUNDLED["coqa"], d / "coqa.test.json.gz")
    with zipfile.ZipFile(d / "dev-v1.1.json.zip", "w") as z:
        z.writestr("dev-v1.1.json", gzip.decompress(data.BUNDLED["squad"].read_bytes()))
    return d


def test_heldout_split_is_disjoint_open_licensed_and_readable(small_data_dir, tmp_path):
    args = ["--data-dir", str(small_data_dir), "--heldout", "5", "--squad-sample", "20"]
    manifest = heldout.main(args + ["--out", str(tmp_path / "a")])
    out = tmp_path / "a"
    stories = data.read_data_file(data.BUNDLED["coqa"])["data"]
    train_ids = [s["id"] for s in data.read_data_file(out / "coqa_train.json.gz")["data"]]
    held = {r.id: r for r in data.load_qa("msmarco-mqa", out / "coqa_heldout50.jsonl")[0]}
    assert len(held) == 5 and not set(held) & set(train_ids) and set(held) | set(train_ids) == {s["id"] for s in stories}
    originals = {r.id: r for r in data.load_qa("coqa", data.BUNDLED["coqa"])[0]}
    for rid, r in held.items():  # whole conversations, every gold answer kept
        assert (r.context, r.qa) == (originals[rid].context, originals[rid].qa)
        assert next(s for s in stories if s["id"] == rid)["source"] in heldout.OPEN_COQA_SOURCES
    squad = data.load_qa("squad", out / "squad_dev1000_seed42.jsonl", mode="1qa")[0]
    dev = {r.id: (r.context, r.qa) for r in data.load_qa("squad", data.BUNDLED["squad"], mode="1qa")[0]}
    assert len(squad) == 20 and all(dev[r.id] == (r.context, r.qa) for r in squad)
    assert manifest["files"]["coqa_heldout50.jsonl"]["contexts"] == 5 and sorted(manifest["heldout_coqa_ids"]) == sorted(held)
    assert heldout.main(args + ["--out", str(tmp_path / "b")])["files"] == manifest["files"]  # seeded
    other = heldout.main(args + ["--out", str(tmp_path / "c"), "--seed", "1"])["files"]
    assert other["coqa_heldout50.jsonl"]["sha256"] != manifest["files"]["coqa_heldout50.jsonl"]["sha256"]


# ----------------------------------------------------------------------------- shine_135m.py and the driver
def tiny_shine_dir(directory):
    tok = chat_tokenizer("qwen3")
    llm = tiny_qwen3(vocab=len(tok))
    torch.manual_seed(1)
    shine = Shine(llm, ShineConfig(lora_rank=2, meta_lora_rank=4, m2p_layers=1))
    for p in shine.hypernetwork_state_dict().values():
        torch.nn.init.normal_(p)
    shine.save_hypernetwork(directory)
    return llm, shine


def test_bf16_export_loads_as_rounded_float32(tmp_path):
    llm, shine = tiny_shine_dir(tmp_path / "fp32")
    helpers.to_bf16(tmp_path / "fp32", tmp_path / "bf16")
    loaded = Shine.from_pretrained(llm, tmp_path / "bf16")
    for name, p in loaded.hypernetwork_state_dict().items():
        original = shine.hypernetwork_state_dict()[name].detach()
        assert p.dtype == torch.float32 and torch.equal(p, original.to(torch.bfloat16).float())
        assert not torch.equal(p, original)
    counts = helpers.parameter_counts(tmp_path / "bf16" / "hypernetwork.safetensors")
    assert counts == {k: v for k, v in shine.parameter_report().items() if k in counts}


def test_timing_picks_steps_from_the_median(tmp_path, capsys):
    for stage in helpers.STAGES:
        (tmp_path / "timing" / stage).mkdir(parents=True)
        (tmp_path / "timing" / stage / "log.jsonl").write_text(
            "\n".join(json.dumps({"ms": ms, "tok_s": 1.0}) for ms in (1000, 900, 800, 100, 100, 120, 110)))
    out = helpers.timing(tmp_path, dict.fromkeys(helpers.STAGES, 1.0), dict.fromkeys(helpers.STAGES, 30.0))
    # 60 s of budget - 30 s of preparation - 2.395 s of warm-up (3.13 s logged, 7 x 105 ms typical) = 27.605 s
    assert out["ift-1qa"]["ms_per_step"] == 105 and out["ift-1qa"]["warmup_s"] == pytest.approx(2.395)
    assert out["ift-1qa"]["suggested_steps"] == 262  # 27.605 s / 105 ms
    assert "export PRETRAIN_STEPS=262 MQA_STEPS=262 ONEQA_STEPS=262" in capsys.readouterr().out


def driver(*commands, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PY": sys.executable, **env}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "shine_135m.sh"), *commands], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def unpack(src, dst):
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "unpack_checkpoint.sh"), str(src), str(dst)],
                          capture_output=True, text=True)


def test_package_splits_and_unpack_rejoins_and_checks(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    llm, shine = tiny_shine_dir(tmp_path / "fp32")
    for i, stage in enumerate(helpers.STAGES):
        helpers.to_bf16(tmp_path / "fp32", run / "export" / stage)
        log = [{"step": s, "loss": 5.0 - s - i, "ms": 500.0} for s in (1, 2)]
        cfg = {"batch_size": 4, "grad_accum": 2, "lr": 1e-4, "max_context": 1150, "data": "a.json,b.json"}
        (run / "export" / stage / "stage.json").write_text(json.dumps(
            {"stage": stage, "train_config": cfg, "seconds": 1.0, "log": log}))
    (run / "data").mkdir()
    (run / "data" / "manifest.json").write_text(json.dumps({"files": {}}))
    out.mkdir()
    driver("package", RUN=str(run), OUT=str(out), PACKAGE_DIR=str(tmp_path / "pkg"), RESULTS=str(tmp_path / "res"),
           PART_SIZE="40K", CKPT_IN=str(tmp_path / "none"))
    parts = sorted((out / "checkpoint").glob("hypernetwork.safetensors.part*"))
    assert len(parts) > 2 and all(p.stat().st_size <= 40 * 1024 for p in parts)
    done = unpack(out / "checkpoint", tmp_path / "back")
    assert done.returncode == 0, done.stderr
    for name in ("hypernetwork.safetensors", "shine_config.json", "training.json", "README.md"):
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "pkg" / name).read_bytes()
    training = json.loads((tmp_path / "res" / "training.json").read_text())
    assert [s["batch"] for s in training["stages"]] == [8, 8, 8] and training["stages"][2]["last_loss"] == 1.5
    Shine.from_pretrained(llm, tmp_path / "back")
    parts[1].write_bytes(parts[1].read_bytes()[:-1] + b"\0")  # one damaged byte
    assert unpack(out / "checkpoint", tmp_path / "again").returncode != 0


@pytest.mark.slow
def test_driver_end_to_end_on_a_tiny_backbone(tiny_backbone_dir, small_data_dir, tmp_path):
    """Every subcommand the lead runs on the GPU, in the same order, at toy sizes: the flags between the driver,
    train.py and evaluate.py agree, and a fresh machine restores checkpoints from the parts it got back."""
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    env = dict(MODEL=str(tiny_backbone_dir), DATA_DIR=str(small_data_dir), RUN=str(run), OUT=str(out),
               RESULTS=str(tmp_path / "results"), PACKAGE_DIR=str(tmp_path / "pkg"), CKPT_IN=str(tmp_path / "none"),
               META_RANK="4", MAX_CONTEXT="48", PRETRAIN_CONTEXT="24", COMPILE="", TRAIN_EXTRA="--lora-rank 2 --m2p-layers 1 --max-answer 200 --val-size 2",
               PRETRAIN_STEPS="2", MQA_STEPS="2", ONEQA_STEPS="2", PRETRAIN_BATCH="2", MQA_BATCH="2", ONEQA_BATCH="2",
               HELDOUT="3", SQUAD_SAMPLE="4", EVAL_LIMIT="2", EVAL_BATCH="2", MAX_NEW_TOKENS="2",
               EVAL_EXTRA="--sft-epochs 1", BENCHES="squad coqa", CURVE_BUCKETS="8,16,48", CURVE_PER_BUCKET="2")
    driver("pretrain", "curves", **env)  # as on the GPU: the pretraining line of Figure 5 while that checkpoint is at hand
    first = json.loads((tmp_path / "results" / "recon_curves.json").read_text())
    assert list(first["summary"]) == ["base", "pretrain"]
    driver("ift-mqa", "ift-1qa", "eval", "curves", "package", **env)
    reports = render.load(tmp_path / "results")
    assert sorted(reports) == ["coqa-heldout", "recon_curves", "squad", "training"]
    assert list(reports["coqa-heldout"]["results"]) == ["naive", "in-context", "sft", "shine"]
    assert reports["squad"]["n"] == 2 and reports["squad"]["checkpoint"].endswith("export/ift-1qa")  # bf16, as shipped
    assert list(reports["recon_curves"]["summary"]) == ["base", "pretrain", "final"]
    assert [s["stage"] for s in reports["training"]["stages"]] == list(helpers.STAGES)
    assert [s["max_context"] for s in reports["training"]["stages"]] == [24, 48, 48]  # PRETRAIN_CONTEXT
    assert np.isfinite(reports["recon_curves"]["summary"]["final"]["recon"]["loss"]["median"]).all()
    assert sorted(p.name for p in (out / "results" / "shine-135m").iterdir()) == [
        "coqa-heldout.json", "recon_curves.json", "squad.json"]
    # a fresh machine that got only the final stage's parts back, and the results file in the tree: curves keeps
    # the pretraining line it cannot recompute, and package rebuilds the same checkpoint
    carried = tmp_path / "carried"
    shutil.copytree(out / "ckpt" / "ift-1qa", carried / "ift-1qa")
    fresh = {**env, "RUN": str(tmp_path / "fresh"), "CKPT_IN": str(carried), "PACKAGE_DIR": str(tmp_path / "pkg2"), "OUT": ""}
    driver("curves", "package", **fresh)
    again = json.loads((tmp_path / "results" / "recon_curves.json").read_text())
    assert again["losses"]["pretrain"] == first["losses"]["pretrain"] and list(again["summary"]) == ["base", "pretrain", "final"]
    for task, losses in reports["recon_curves"]["losses"]["final"].items():  # the same bf16 weights
        assert again["losses"]["final"][task] == pytest.approx(losses, rel=1e-6)
    for name in ("hypernetwork.safetensors", "shine_config.json"):
        assert (tmp_path / "pkg2" / name).read_bytes() == (tmp_path / "pkg" / name).read_bytes()
    # a retrained checkpoint re-runs SHINE alone; the baselines' answers are kept, not recomputed
    driver("eval", **{**fresh, "TABLE2_METHODS": "shine", "MERGE": "1", "BENCHES": "squad", "DATA": str(run / "data")})
    merged = json.loads((tmp_path / "results" / "squad.json").read_text())
    assert list(merged["results"]) == ["naive", "in-context", "shine"]
    assert merged["results"]["naive"] == reports["squad"]["results"]["naive"]
    assert merged["config"]["shine_ckpt"].startswith(str(tmp_path / "fresh"))
