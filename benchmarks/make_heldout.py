"""Data of SHINE-135M (issue 7): training files, 50 held-out CoQA conversations and the SQuAD dev sample.

    python benchmarks/make_heldout.py --data-dir .carry_data --out runs/135m/data    # or --data-dir ../shared/data

Reads SQuADShifts (4 domains), CoQA (BIG-bench's coqa.test.json, 700 stories) and SQuAD v1.1 dev from --data-dir,
flat (.carry_data) or in subfolders (../shared/data), and writes into --out:

    squadshifts_{domain}.json.gz  copies: pretraining contexts, ift-mqa (grouped by paragraph), ift-1qa
    coqa_train.json.gz            CoQA without the held-out stories, original layout: pretraining and ift-mqa
    coqa_heldout50.jsonl          the held-out conversations {id, context, conversations: [{question, answer}]}
    squad_dev1000_seed42.jsonl    1,000 SQuAD v1.1 dev questions drawn with seed 42, one per line, same layout
    manifest.json                 every file with its sha256 and counts: the checkpoint's data list

The held-out stories come from the two domains CoQA shares under CC BY-SA 4.0 (Wikipedia, Literature), so the
results JSON, which quote their questions and answers, can be shared under that licence.
"""
import argparse
import gzip
import json
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402

DOMAINS = ("new_wiki", "nyt", "reddit", "amazon")
OPEN_COQA_SOURCES = ("wikipedia", "gutenberg")  # CoQA's CC BY-SA 4.0 domains
HELDOUT, SQUAD_SAMPLE, SEED = 50, 1000, 42
USE = {"squadshifts": "pretraining, ift-mqa, ift-1qa", "coqa_train": "pretraining, ift-mqa",
       "coqa_heldout50": "evaluation only (Table 1)", "squad_dev1000_seed42": "evaluation only (Table 2)"}


def find(data_dir: Path, name: str) -> Path:
    """`name` directly in data_dir or one folder down (../shared/data keeps one folder per dataset)."""
    hits = [data_dir / name, *sorted(data_dir.glob(f"*/{name}"))]
    path = next((p for p in hits if p.is_file()), None)
    if path is None:
        raise SystemExit(f"make_heldout.py: {name} not found in {data_dir} or its subfolders")
    return path


def write_conversations(records: list[data.QARecord], path: Path) -> None:
    """Generic JSONL that data.load_qa reads back (layout "conversations"), every gold answer kept."""
    with open(path, "w") as f:
        for r in records:
            turns = [{"question": q, "answer": answers} for q, answers in r.qa]
            f.write(json.dumps({"id": r.id, "context": r.context, "conversations": turns}) + "\n")


def split_coqa(stories: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): n stories drawn with `seed` from the CC BY-SA domains; the rest train."""
    candidates = [s["id"] for s in stories if s.get("source") in OPEN_COQA_SOURCES]
    held = set(random.Random(seed).sample(sorted(candidates), n))
    return [s for s in stories if s["id"] not in held], [s for s in stories if s["id"] in held]


def sample_squad(records: list[data.QARecord], n: int, seed: int) -> list[data.QARecord]:
    """n questions drawn with `seed`, in their dev-file order."""
    return [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), n))]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=".carry_data")
    p.add_argument("--out", default="runs/135m/data")
    p.add_argument("--heldout", type=int, default=HELDOUT)
    p.add_argument("--squad-sample", type=int, default=SQUAD_SAMPLE)
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    src, out = Path(args.data_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for d in DOMAINS:
        shutil.copyfile(find(src, f"squadshifts_{d}.json.gz"), out / f"squadshifts_{d}.json.gz")

    coqa = data.read_data_file(find(src, "coqa.test.json.gz"))
    train, held = split_coqa(coqa["data"], args.heldout, args.seed)
    (out / "coqa_train.json.gz").write_bytes(gzip.compress(json.dumps({**coqa, "data": train}).encode(), mtime=0))
    held_records, _ = data.clean_records(data.read_records({"data": held}, "coqa"), "mqa")
    write_conversations(held_records, out / "coqa_heldout50.jsonl")

    squad, _ = data.load_qa("squad", find(src, "dev-v1.1.json.zip"), mode="1qa")
    write_conversations(sample_squad(squad, args.squad_sample, args.seed), out / "squad_dev1000_seed42.jsonl")

    manifest = {"seed": args.seed, "files": {}}
    for path in sorted(out.glob("*.json*")):
        if path.name != "manifest.json":
            records, _ = data.load_qa(path.name, path, mode="mqa")
            use = next(u for prefix, u in USE.items() if path.name.startswith(prefix))
            manifest["files"][path.name] = {"use": use, "sha256": data.sha256_of(path), "contexts": len(records),
                                            "questions": sum(len(r.qa) for r in records)}
    manifest["heldout_coqa_ids"] = [s["id"] for s in held]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for name, info in manifest["files"].items():
        print(f"{name:<30} {info['contexts']:>6} contexts {info['questions']:>7} questions")
    return manifest


if __name__ == "__main__":
    main()
