"""Retrieval and answer quality on a corpus nobody here wrote: Python's language reference topics.

    python benchmarks/rag_eval.py                    # every embedder, then rag ask vs plain chat on 30 questions
    python benchmarks/rag_eval.py --embedders minilm --answers 0

Corpus: ``pydoc_data.topics`` (the 79 topics ``help()`` shows, shipped with CPython), one document per topic.
Questions: ``benchmarks/data/pydoc_questions.jsonl``, each written from one topic (the gold passage) with a fact
the topic states verbatim. Retrieval: each embedder indexes the corpus (200-token chunks, 40 overlap, as
``llama3 rag index``); a question's rank is that of the first chunk from its gold topic among the top 20
(topics counted once). Reported: recall@1, recall@5 and MRR. Answers: the default model answers the first
``--answers`` questions with ``rag_answer`` (all-MiniLM-L6-v2 store, k=4, min-score 0.3) and as a plain chat
(no sources), greedy; scored by whether the fact appears in the answer (whitespace, quotes and case ignored)
and by ROUGE-L F1 against the fact.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUESTIONS = HERE / "data" / "pydoc_questions.jsonl"


def norm(text: str) -> str:
    return " ".join(text.replace('"', "").replace("*", "").replace("`", "").split()).lower()


def write_corpus(root: Path) -> Path:
    from pydoc_data.topics import topics

    root.mkdir(parents=True, exist_ok=True)
    for name, text in topics.items():
        (root / f"{name}.txt").write_text(text)
    return root


def retrieval(embedder, corpus: Path, questions: list[dict], db: Path) -> dict:
    from llama3.rag.answer import retrieve
    from llama3.rag.embedders import recorded_name
    from llama3.rag.index import index_paths
    from llama3.rag.store import LocalStore

    store = LocalStore(db, embedder=recorded_name(embedder), dimensions=embedder.dimensions)
    start = time.perf_counter()
    report = index_paths(store, embedder, [corpus], progress=False)
    index_s = time.perf_counter() - start
    ranks = []
    start = time.perf_counter()
    for q in questions:
        topics: list[str] = []
        for hit in retrieve(store, embedder, q["question"], k=20):
            topic = Path(hit.path).stem
            if topic not in topics:
                topics.append(topic)
        ranks.append(topics.index(q["topic"]) + 1 if q["topic"] in topics else None)
    query_ms = 1e3 * (time.perf_counter() - start) / len(questions)
    store.close()
    n = len(ranks)
    return {"chunks": report.chunks, "index_s": index_s, "query_ms": query_ms,
            "recall@1": sum(r == 1 for r in ranks) / n, "recall@5": sum(r is not None and r <= 5 for r in ranks) / n,
            "mrr": sum(1 / r for r in ranks if r) / n}


def answers(llm, db: Path, questions: list[dict]) -> dict:
    from rouge_score import rouge_scorer

    from llama3.rag.answer import rag_answer
    from llama3.rag.embedders import open_store

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    store, embedder = open_store(db)
    rows = []
    for q in questions:
        rag = rag_answer(llm, store, embedder, q["question"], k=4, min_score=0.3, max_gen_len=96, temperature=0)
        plain = llm.chat_completion([[{"role": "user", "content": q["question"]}]], max_gen_len=96,
                                    temperature=0)[0]["generation"]["content"]
        rows.append({"question": q["question"], "fact": q["fact"], "rag": rag.text, "plain": plain,
                     "rag_cited": rag.cited, "gold_in_sources": any(Path(h.path).stem == q["topic"]
                                                                     for h in rag.sources)})
    store.close()
    out = {}
    for kind in ("rag", "plain"):
        out[kind] = {
            "fact": sum(norm(r["fact"]) in norm(r[kind]) for r in rows) / len(rows),
            "rougeL": sum(scorer.score(r["fact"], r[kind])["rougeL"].fmeasure for r in rows) / len(rows),
        }
    out["rag"]["cites"] = sum(bool(r["rag_cited"]) for r in rows) / len(rows)
    out["rag"]["gold_in_sources"] = sum(r["gold_in_sources"] for r in rows) / len(rows)
    out["rows"] = rows
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embedders", nargs="+", default=["minilm", "llama:mean", "llama:last"])
    p.add_argument("--answers", type=int, default=30, help="questions answered by rag ask and plain chat")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    from llama3.generation import Llama
    from llama3.rag.embedders import embedder_for

    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    llm = Llama.build(None, max_seq_len=2048, max_batch_size=1)
    results: dict = {"retrieval": {}}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "topics")
        print(f"{len(questions)} questions over {len(list(corpus.iterdir()))} pydoc topics")
        print(f"{'embedder':14}{'chunks':>8}{'index s':>9}{'query ms':>10}{'R@1':>7}{'R@5':>7}{'MRR':>7}")
        for spec in args.embedders:
            embedder = embedder_for(spec, lambda: llm)
            r = retrieval(embedder, corpus, questions, Path(tmp) / spec.replace(":", "_"))
            results["retrieval"][spec] = r
            print(f"{spec:14}{r['chunks']:8d}{r['index_s']:9.1f}{r['query_ms']:10.1f}{r['recall@1']:7.2f}"
                  f"{r['recall@5']:7.2f}{r['mrr']:7.3f}")
        if args.answers and "minilm" in args.embedders:
            a = answers(llm, Path(tmp) / "minilm", questions[: args.answers])
            results["answers"] = a
            print(f"answers on {args.answers} questions (SmolLM2-135M-Instruct, greedy, 96 tokens):")
            print(f"  rag ask:    fact in answer {a['rag']['fact']:.2f}, ROUGE-L {a['rag']['rougeL']:.3f}, "
                  f"cites [n] {a['rag']['cites']:.2f}, gold topic among sources {a['rag']['gold_in_sources']:.2f}")
            print(f"  plain chat: fact in answer {a['plain']['fact']:.2f}, ROUGE-L {a['plain']['rougeL']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
