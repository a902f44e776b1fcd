"""WordNet database files (Debian ``wordnet-base``, /usr/share/wordnet): the 45
lexicographer files ("supersenses"), synset glosses, and a word -> supersense
lexicon for token-level labelling.

Lexicon rule: a single-word lemma gets the supersense of its most frequent
sense: among its parts of speech, the one with the highest tagged-sense count
(ties: noun, verb, adj, adv), and that part of speech's first synset.
Inflected forms from the ``*.exc`` files inherit their base form's label.
"""

from __future__ import annotations

from collections.abc import Iterator

from etils import epath

DEFAULT_DIR = "/usr/share/wordnet"
POS = ("noun", "verb", "adj", "adv")

# lex_filenum -> name, from WordNet's lexnames(5WN).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()
assert len(LEXNAMES) == 45

DESCRIPTIONS = {
    "adj.all": "all adjective clusters", "adj.pert": "relational adjectives (pertainyms)",
    "adv.all": "all adverbs", "noun.Tops": "unique beginner for nouns",
    "adj.ppl": "participial adjectives",
}


def description(lexname: str) -> str:
    if lexname in DESCRIPTIONS:
        return DESCRIPTIONS[lexname]
    pos, what = lexname.split(".", 1)
    return f"{pos}s of {what}"


def _lines(wordnet_dir, name: str) -> list[str]:
    return epath.Path(wordnet_dir, name).read_bytes().decode("utf-8", "replace").splitlines()


def available(wordnet_dir=DEFAULT_DIR) -> bool:
    d = epath.Path(wordnet_dir)
    return all((d / f"data.{p}").exists() and (d / f"index.{p}").exists() for p in POS)


def iter_synsets(wordnet_dir=DEFAULT_DIR, pos: str = "noun") -> Iterator[tuple[str, str, list[str], str]]:
    """(offset, lexname, words, gloss) of every synset in data.<pos>."""
    for line in _lines(wordnet_dir, f"data.{pos}"):
        if line.startswith("  "):
            continue  # license header
        head, _, gloss = line.partition(" | ")
        parts = head.split()
        n_words = int(parts[3], 16)
        words = [parts[4 + 2 * i].replace("_", " ") for i in range(n_words)]
        yield parts[0], LEXNAMES[int(parts[1])], words, gloss.strip()


def build_lexicon(wordnet_dir=DEFAULT_DIR) -> dict[str, str]:
    """word -> supersense (lexname) for single-word lemmas and their inflections."""
    first_lex = {}
    for pos in POS:
        for line in _lines(wordnet_dir, f"data.{pos}"):
            if not line.startswith("  "):
                off, filenum, _ = line.split(" ", 2)
                first_lex[(pos, off)] = LEXNAMES[int(filenum)]
    best: dict[str, tuple[int, int, str]] = {}
    for rank, pos in enumerate(POS):
        for line in _lines(wordnet_dir, f"index.{pos}"):
            if line.startswith("  "):
                continue
            parts = line.split()
            lemma = parts[0]
            if "_" in lemma or "-" in lemma or not lemma.isalpha():
                continue
            p_cnt = int(parts[3])
            tagged = int(parts[5 + p_cnt])
            offset = parts[6 + p_cnt]
            cand = (-tagged, rank, first_lex[(pos, offset)])
            if lemma not in best or cand < best[lemma]:
                best[lemma] = cand
    lex = {w: v[2] for w, v in best.items()}
    for pos in POS:
        exc = epath.Path(wordnet_dir, f"{pos}.exc")
        if not exc.exists():
            continue
        for line in exc.read_bytes().decode("utf-8", "replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isalpha() and parts[0] not in lex and parts[1] in lex:
                lex[parts[0]] = lex[parts[1]]
    return lex


def write_lexicon_tsv(lexicon: dict[str, str], path, prefix: str = "supersense:") -> None:
    """Writes ``word<TAB>concept name`` lines, sorted (deterministic)."""
    lines = [f"{w}\t{prefix}{lexicon[w]}" for w in sorted(lexicon)]
    epath.Path(path).write_text("\n".join(lines) + "\n")
