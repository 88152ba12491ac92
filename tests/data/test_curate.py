"""Curation: each quality rule on crafted text, and a corpus with planted duplicates, near-duplicates and junk:
every planted document is found, for the right reason, and nothing else is removed."""

import json
import random

import pytest

from gptlab.cli import run
from gptlab.data.curate import (Curation, Deduplicator, quality_problem, repeated_line_fraction,
                                repeated_ngram_fraction)
from gptlab.errors import GptlabError

QUALITY = Curation(quality=True)


def test_each_quality_rule_names_itself():
    prose = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch, and "
             "his daughter counts the geese that walk slowly back toward the barn before the evening rain.")
    assert quality_problem(prose, QUALITY) is None
    assert quality_problem("too short", QUALITY)[0] == "min_chars"
    assert quality_problem("1234 5678 9012 " * 10 + prose[:40], QUALITY)[0] == "max_digit_ratio"
    assert quality_problem("$$$ ### +++ === " * 10 + prose, QUALITY)[0] == "max_symbol_ratio"
    assert quality_problem("(..., ;;; !!!) " * 10 + prose[:60], QUALITY)[0] == "max_non_letter_ratio"
    spam = "\n".join(["Buy now at our shop today!"] * 8 + ["A different closing line for the page here."])
    assert quality_problem(spam, QUALITY)[0] == "max_repeated_lines"
    assert quality_problem("one two three four five six " * 6 + prose, QUALITY)[0] == "max_repeated_ngrams"
    assert quality_problem("too short", Curation(quality=True, min_chars=None)) is None  # a rule turned off


def test_rules_are_language_agnostic():
    texts = ["Съешь же ещё этих мягких французских булок, да выпей чаю. Вот и вся история про завтрак у окна.",
             "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले विष्णुवतार भगवान श्रीराम, "
             "अयोध्या के महाराज दशरथ के बड़े सपुत्र थे।",
             "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία, και ο γέροντας κάθεται στο παράθυρο κοιτάζοντας τη θάλασσα."]
    for text in texts:
        assert quality_problem(text, QUALITY) is None, text


def test_repetition_measures():
    assert repeated_line_fraction("a\nb\na\na\n\n") == pytest.approx(0.5)  # 2 of 4 non-empty lines repeat
    assert repeated_ngram_fraction("a b c a b c", 3) == pytest.approx(1.0)
    assert repeated_ngram_fraction("a b c d e f", 3) == 0.0


def test_deduplicator_keeps_the_first_copy():
    dd = Deduplicator(Curation(dedup="near", jaccard=0.8))
    base = " ".join(f"word{i}" for i in range(200))
    assert dd.check("a", base) is None
    assert dd.check("b", base) == ("exact_duplicate", "a")
    reason, first = dd.check("c", base.replace("word7 ", "changed "))
    assert reason == "near_duplicate" and first.startswith("a ")
    assert dd.check("d", " ".join(f"other{i}" for i in range(200))) is None


def test_bad_thresholds_are_refused():
    with pytest.raises(GptlabError, match="--jaccard"):
        Curation(jaccard=1.5)
    with pytest.raises(GptlabError, match="--dedup"):
        Curation(dedup="fuzzy")
    with pytest.raises(GptlabError, match="--max-digit-ratio"):
        Curation(max_digit_ratio=2.0)


def _paragraphs(shared_data, n):
    text = (shared_data / "tinyshakespeare.txt").read_text()
    paras, seen = [], set()
    for p in text.split("\n\n"):
        if 300 < len(p) < 2000 and p not in seen:
            seen.add(p)
            paras.append(p)
    return paras[:n]


def _near_copy(text: str, rng: random.Random) -> str:
    """Change one word of ``text``: its word-3-gram Jaccard similarity to ``text`` stays above 0.9 for these
    60+ word paragraphs, well clear of the 0.8 threshold (MinHash with 128 permutations estimates it +-0.04)."""
    words = text.split(" ")
    words[rng.randrange(len(words))] = "changed"
    return " ".join(words)


def _planted_corpus(root, shared_data):
    """40 distinct real paragraphs, plus 4 exact copies, 4 near copies and 5 junk documents."""
    rng = random.Random(0)
    good = _paragraphs(shared_data, 40)
    assert len(good) == 40
    (root / "books").mkdir(parents=True)
    for i, p in enumerate(good[:25]):
        (root / "books" / f"p{i:02d}.txt").write_text(p)
    lines = [{"text": p} for p in good[25:]]
    planted = {"exact_duplicate": [], "near_duplicate": [], "junk": []}
    for i in (1, 7):  # copies after their original in corpus order (books/ sorts before web.jsonl)
        (root / "books" / f"zcopy{i:02d}.txt").write_text(good[i])
        planted["exact_duplicate"].append(f"books/zcopy{i:02d}.txt")
    for i in (3, 12):
        (root / "books" / f"znear{i:02d}.txt").write_text(_near_copy(good[i], rng))
        planted["near_duplicate"].append(f"books/znear{i:02d}.txt")
    copies = [("exact_duplicate", good[15]), ("near_duplicate", _near_copy(good[18], rng)),
              ("exact_duplicate", good[30]), ("near_duplicate", _near_copy(good[34], rng))]  # inside the JSONL
    junk = ["tiny", "0123456789 " * 40, "<<>> ~~ ^^ || {} $ % " * 20,
            "\n".join(["Click here to subscribe to our newsletter"] * 12),
            "free offer limited time only act now " * 20]
    lines += [{"text": t} for _, t in copies] + [{"text": j} for j in junk]
    with open(root / "web.jsonl", "w") as f:
        offsets = []
        for d in lines:
            offsets.append(f.tell())
            f.write(json.dumps(d) + "\n")
    for (reason, _), o in zip(copies, offsets[-len(junk) - len(copies):-len(junk)]):
        planted[reason].append(f"web.jsonl@{o}")
    planted["junk"] = [f"web.jsonl@{o}" for o in offsets[-len(junk):]]
    return good, planted


@pytest.fixture(scope="module")
def planted(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("planted")
    good, planted = _planted_corpus(root / "corpus", shared_data)
    out = root / "out"
    assert run(["prepare", "--data", str(root / "corpus"), "--out", str(out), "--tokenizer", "char",
                "--workers", "2", "--shard-mb", "0.004", "--dedup", "near", "--quality", "--progress", "false"]) == 0
    return good, planted, out


def test_every_planted_document_is_found_and_nothing_else(planted):
    good, planted_docs, out = planted
    report = json.loads((out / "curation.json").read_text())["report"]
    examples = {r: {e["document"] for e in ex} for r, ex in report["examples"].items()}
    assert report["removed"]["exact_duplicate"] == 4 and examples["exact_duplicate"] == set(planted_docs["exact_duplicate"])
    assert report["removed"]["near_duplicate"] == 4 and examples["near_duplicate"] == set(planted_docs["near_duplicate"])
    quality = {d for r, names in examples.items() if r not in ("exact_duplicate", "near_duplicate") for d in names}
    assert quality == set(planted_docs["junk"])
    assert sum(report["removed"].values()) == 13 and report["kept"] == 40 == len(good)


def test_the_kept_text_is_exactly_the_distinct_good_documents(planted):
    from gptlab.data import load_prepared

    good, _, out = planted
    data = load_prepared(out)
    tok = data.tokenizer()
    index = json.loads((out / "index.json").read_text())
    import numpy as np

    texts = []
    for e in index["shards"]:
        ids = np.fromfile(out / e["file"], dtype=index["dtype"])
        starts = np.load(out / e["file"].replace(".bin", ".docs.npy"))
        texts += [tok.decode(ids[a:b - 1].tolist()) for a, b in zip(starts[:-1], starts[1:])]  # b-1: the EOS
    assert sorted(texts) == sorted(good)


def test_exact_only_and_the_report_line(tmp_path, shared_data, capsys):
    _planted_corpus(tmp_path / "c", shared_data)
    assert run(["prepare", "--data", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--tokenizer", "char",
                "--dedup", "exact", "--progress", "false"]) == 0
    out = capsys.readouterr().out
    assert "curation: kept 49 of 53 documents; removed 4 exact_duplicate" in out


def test_the_jaccard_threshold_decides():
    from gptlab.data.curate import shingles

    base = " ".join(f"w{i}" for i in range(300))
    edited = base.replace("w50 ", "x ").replace("w150 ", "y ").replace("w250 ", "z ")
    a, b = shingles(base, 3), shingles(edited, 3)
    true = len(a & b) / len(a | b)
    assert 0.9 < true < 0.95
    loose, strict = Deduplicator(Curation(dedup="near", jaccard=0.8)), Deduplicator(Curation(dedup="near", jaccard=0.97))
    for dd in (loose, strict):
        assert dd.check("a", base) is None
    assert loose.check("b", edited)[0] == "near_duplicate"
    assert strict.check("b", edited) is None
    with pytest.raises(GptlabError, match="raise --num-perm"):
        Deduplicator(Curation(dedup="near", jaccard=0.999, num_perm=16))
