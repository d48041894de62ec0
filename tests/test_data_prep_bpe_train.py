"""``train_tokenizer`` (weighted streaming sample, specials, held-out docs) and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lmfab.cli import main
from lmfab.data.prep.bpe_train import (
    PAD_TOKEN,
    detect_lang,
    parse_weights,
    sampling_rates,
    train_tokenizer,
)
from lmfab.data.prep.encode import split_hash
from lmfab.data.prep.fertility import fertility_report, format_table
from lmfab.data.prep.readers import iter_documents

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "books.jsonl.zst"
ARABIC = [
    "بسم الله الرحمن الرحيم. الحمد لله رب العالمين، الرحمن الرحيم، مالك يوم الدين.",
    "كان الطقس جميلا في المدينة القديمة، وخرج الناس إلى الأسواق والحدائق في المساء.",
    "تعلم البرمجة يحتاج إلى صبر وممارسة يومية، وقراءة الشيفرة التي كتبها الآخرون.",
    "المكتبة مفتوحة من الصباح حتى المساء، وفيها كتب كثيرة في التاريخ والأدب والعلوم.",
]


def write_jsonl(path: Path, texts: list[str], source: str) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "meta": {"redpajama_set_name": source}},
                               ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def bilingual(tmp_path_factory):
    """~400 KB of English (Books) and ~9 KB of Arabic (two sources, one file each)."""
    root = tmp_path_factory.mktemp("bi")
    english = [d.text[:5000] for d in iter_documents([SAMPLE])][:80]
    arabic = [f"{a} ({i})" for i in range(25) for a in ARABIC[i % 2 :: 2]]
    write_jsonl(root / "en.jsonl", english, "Books")
    write_jsonl(root / "ar.jsonl", arabic, "Arabic")
    return root, english, arabic


def test_detect_lang_and_weights_parsing():
    assert detect_lang(ARABIC[0]) == "ar" and detect_lang("The quick brown fox.") == "en"
    assert detect_lang("Привет, мир") == "other" and detect_lang("1234 + 5678 = ?") == "none"
    assert detect_lang("word " * 3 + ARABIC[0]) == "ar"  # majority of the letters
    assert parse_weights("ar=1, en=0.5,*=0") == {"ar": 1.0, "en": 0.5, "*": 0.0}
    for bad in ("ar", "ar=x", "=1", "ar=-1", ""):
        with pytest.raises(ValueError):
            parse_weights(bad)


def test_sampling_rates():
    avail = {"en": 900, "ar": 100}
    assert sampling_rates(avail, None, None) == {"en": 1.0, "ar": 1.0}
    assert sampling_rates(avail, None, 500) == {"en": 0.5, "ar": 0.5}
    # balanced, no size: the largest sample without repetition (200 bytes: 100 + 100)
    assert sampling_rates(avail, {"en": 1, "ar": 1}, None) == pytest.approx({"en": 1 / 9, "ar": 1})
    # balanced at 1000 bytes: Arabic is repeated 5 times, English halved
    assert sampling_rates(avail, {"en": 1, "ar": 1}, 1000) == pytest.approx({"en": 5 / 9, "ar": 5})
    assert sampling_rates(avail, {"ar": 1, "*": 0}, 100) == {"en": 0.0, "ar": 1.0}
    with pytest.raises(ValueError, match=r"no weight for group\(s\) \['en'\]"):
        sampling_rates(avail, {"ar": 1}, None)
    with pytest.raises(ValueError, match=r"\['fr'\], which has no documents \(an empty source\)"):
        sampling_rates(avail, {"ar": 1, "en": 1, "fr": 1}, None)


def test_balanced_training_gives_arabic_its_share(bilingual, tmp_path):
    root, english, arabic = bilingual
    plain = train_tokenizer([str(root)], tmp_path / "plain.json", vocab_size=600,
                            progress=False)
    bal = train_tokenizer([str(root)], tmp_path / "bal.json", vocab_size=600, by="lang",
                          weights="ar=1,en=1", sample_bytes=200_000, progress=False)
    g = bal["groups"]
    assert g["ar"]["rate"] > 10 and g["en"]["rate"] < 1  # Arabic repeated, English thinned
    assert g["ar"]["sampled_bytes"] == pytest.approx(100_000, rel=0.1)
    assert g["en"]["sampled_bytes"] == pytest.approx(100_000, rel=0.35)
    assert plain["groups"]["Arabic"]["rate"] == 1.0
    assert plain["special_tokens"] == {"<|endoftext|>": 0}
    tok_plain = Tokenizer.from_file(str(tmp_path / "plain.json"))
    tok_bal = Tokenizer.from_file(str(tmp_path / "bal.json"))
    n_plain = sum(len(tok_plain.encode(a).ids) for a in ARABIC)
    n_bal = sum(len(tok_bal.encode(a).ids) for a in ARABIC)
    assert n_bal < 0.8 * n_plain  # balancing spends merges on Arabic
    for text in (*ARABIC, english[0][:300], "  mixed عربي text\n"):
        assert tok_bal.decode(tok_bal.encode(text).ids) == text  # lossless


def test_specials_and_held_out_documents(bilingual, tmp_path):
    root, english, arabic = bilingual
    s = train_tokenizer([str(root)], tmp_path / "t.json", vocab_size=500,
                        special_tokens=["<|endoftext|>", PAD_TOKEN, "<|sep|>"],
                        val_fraction=0.2, seed=3, progress=False)
    assert s["special_tokens"] == {"<|endoftext|>": 0, PAD_TOKEN: 1, "<|sep|>": 2}
    held = sum(split_hash(t, 3) < 0.2 for t in english + arabic)
    assert 0 < held and sum(v["documents"] for v in s["groups"].values()) == len(
        english + arabic) - held
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        train_tokenizer([str(root)], tmp_path / "x.json", vocab_size=258,
                        special_tokens=["a", "b", "c"], progress=False)
    with pytest.raises(ValueError, match="Arabik.*empty source"):
        train_tokenizer([str(root)], tmp_path / "x.json", vocab_size=300,
                        weights="Arabik=1,*=1", progress=False)
    assert not (tmp_path / "x.json").exists()


def foreign_tokenizer(path: Path, texts: list[str]) -> Path:
    """A WordPiece tokenizer with a normalizer: the report must take any tokenizer.json."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    tok.save(str(path))
    return path


def test_report_side_by_side(bilingual, tmp_path):
    root, english, arabic = bilingual
    train_tokenizer([str(root)], tmp_path / "plain" / "tokenizer.json", vocab_size=600,
                    progress=False)
    wp = foreign_tokenizer(tmp_path / "wordpiece.json", english[:20])
    rep = fertility_report([str(tmp_path / "plain" / "tokenizer.json"), f"wp={wp}"], [str(root)],
                           max_bytes=50_000, out_dir=tmp_path / "rep", progress=False)
    rows = {(r["tokenizer"], r["grouping"], r["group"]): r for r in rep["rows"]}
    assert {k[0] for k in rows} == {"plain", "wp"}
    assert {k[1:] for k in rows} == {("source", "Books"), ("source", "Arabic"), ("lang", "ar"),
                                     ("lang", "en"), ("all", "all")}
    ar = rows["plain", "source", "Arabic"]
    assert ar["docs"] == len(arabic) and ar["bytes"] == sum(len(a.encode()) for a in arabic)
    assert ar["words"] == sum(len(a.split()) for a in arabic)
    assert ar["tokens_per_word"] == ar["tokens"] / ar["words"]
    assert ar["bytes_per_token"] == ar["bytes"] / ar["tokens"]
    assert rows["plain", "source", "Books"]["bytes"] <= 60_000  # capped sample of ~400 KB
    assert rows["wp", "source", "Books"]["tokens_per_word"] < ar["tokens_per_word"]
    for name in ("report.md", "report.json", "fertility.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 100
    assert (tmp_path / "rep" / "fertility.png").read_bytes()[:4] == b"\x89PNG"
    assert "| lang:ar |" in format_table(rep["rows"])


def test_cli_train_and_report(bilingual, tmp_path, capsys):
    root, _, _ = bilingual
    tok = tmp_path / "t" / "tokenizer.json"
    assert main(["data", "tokenizer", "train", "--input", str(root), "--out", str(tok),
                 "--vocab_size", "400", "--by", "lang", "--weights", "ar=1,en=1"]) == 0
    summary = json.loads(tok.with_suffix(".train.json").read_text())
    assert summary["special_tokens"] == {"<|endoftext|>": 0, "<|pad|>": 1}
    assert main(["data", "tokenizer", "report", "--tokenizer", str(tok), "--input", str(root),
                 "--max_bytes", "20000"]) == 0
    assert "| Arabic |" in capsys.readouterr().out
    assert main(["data", "tokenizer", "train", "--input", str(root), "--out", str(tok),
                 "--vocab_size", "400", "--weights", "Nope=1"]) == 2
    assert "empty source" in capsys.readouterr().err


def test_marks_pre_tokenizer_keeps_diacritised_words_whole(tmp_path):
    quran = "بِسۡمِ ٱللَّهِ ٱلرَّحۡمَٰنِ ٱلرَّحِيمِ ﴿١﴾ ٱلۡحَمۡدُ لِلَّهِ رَبِّ ٱلۡعَٰلَمِينَ ﴿٢﴾\n"
    corpus = write_jsonl(tmp_path / "q.jsonl", [quran * 20, "plain English text. " * 50], "Q")
    n = {}
    for kind in ("gpt2", "gpt2-marks"):
        out = tmp_path / f"{kind}.json"
        s = train_tokenizer([str(corpus)], out, vocab_size=400, pre_tokenizer=kind,
                            min_frequency=1, progress=False)
        assert s["pre_tokenizer"] == kind
        tok = Tokenizer.from_file(str(out))
        assert tok.decode(tok.encode(quran + " it's 42!").ids) == quran + " it's 42!"
        n[kind] = len(tok.encode(quran).ids)
    assert n["gpt2-marks"] < 0.5 * n["gpt2"]  # GPT-2's split cuts at every vowel sign
    with pytest.raises(ValueError, match="unknown pre-tokenizer"):
        train_tokenizer([str(corpus)], tmp_path / "x.json", vocab_size=300, pre_tokenizer="x")
