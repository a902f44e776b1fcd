"""Pluggable labelers: each maps a LabelledDoc to a LabelledDoc with more labels.

    imported            keep the labels the input carries ("concepts", "chunks")
                        (without it they are dropped)
    metadata:F=P,...    document concept P + str(value) for each metadata field F
                        (e.g. ``metadata:genre=genre:`` turns {"genre": "comedy"}
                        into the concept "genre:comedy"); list values give several
    lexicon:PATH        token-level labels from a ``word<TAB>concept`` file (e.g.
                        WordNet supersenses from ``wordnet.write_lexicon_tsv``):
                        every occurrence of a listed word (case-insensitive,
                        with simple English inflections) labels the characters
                        of that word; the tokens covering them get the concept.

``make_labelers(["imported", "lexicon:/x.tsv"])`` builds the chain from CLI specs.
"""

from __future__ import annotations

import re

from etils import epath

from cbm_lm.data.inputs import LabelledDoc

_WORD = re.compile(r"[A-Za-z]+")
# Function words that WordNet lists with rare content senses ("a" = vitamin A,
# "will" = volition, "may" = the month); labelling them would be noise.
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from
further had has have having he her here hers herself him himself his how i if in into is it
its itself just me might more most must my myself no nor not now o of off on once only or
other our ours ourselves out over own s same shall she should so some such t than that the
their theirs them themselves then there these they this those thou thee thy thine through to
too under until up upon us very was we were what when where which while who whom why will
with would ye yet you your yours yourself yourselves hath doth art shalt wilt thus let may
""".split())
_SUFFIXES = (("ies", "y"), ("es", ""), ("s", ""), ("ied", "y"), ("ed", "e"), ("ed", ""),
             ("ing", "e"), ("ing", ""), ("er", ""), ("est", ""), ("ly", ""))


class ImportedLabeler:
    """Keeps labels carried by the input record (no-op); its absence drops them."""
    keeps_input_labels = True

    def __call__(self, doc: LabelledDoc) -> LabelledDoc:
        return doc


class MetadataLabeler:
    """Document-level concepts from metadata fields: ``{field: concept prefix}``."""

    def __init__(self, fields: dict[str, str]):
        self.fields = dict(fields)

    def __call__(self, doc: LabelledDoc) -> LabelledDoc:
        for field, prefix in self.fields.items():
            value = doc.meta.get(field)
            if value is None:
                continue
            for v in value if isinstance(value, list) else [value]:
                name = f"{prefix}{v}"
                if name not in doc.concepts:
                    doc.concepts.append(name)
        return doc


_LEXICON_CACHE: dict[str, dict[str, str]] = {}


def load_lexicon(path) -> dict[str, str]:
    """Reads ``word<TAB>concept`` lines (cached per path); errors name the line."""
    key = str(path)
    if key not in _LEXICON_CACHE:
        lex = {}
        for n, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise ValueError(f"{path}:{n}: expected 'word<TAB>concept', got {line[:60]!r}")
            lex[parts[0].lower()] = parts[1]
        _LEXICON_CACHE[key] = lex
    return _LEXICON_CACHE[key]


class LexiconLabeler:
    """Token-level labels: every lexicon word in the text labels its characters."""

    def __init__(self, lexicon: dict[str, str] | str, stopwords=STOPWORDS):
        self._path = lexicon if isinstance(lexicon, str) else None
        self._lexicon = None if self._path else dict(lexicon)
        self.stopwords = frozenset(stopwords)

    @property
    def lexicon(self) -> dict[str, str]:
        if self._lexicon is None:
            self._lexicon = load_lexicon(self._path)
        return self._lexicon

    def lookup(self, word: str) -> str | None:
        w = word.lower()
        if w in self.stopwords or len(w) < 2:
            return None
        lex = self.lexicon
        if w in lex:
            return lex[w]
        for suf, rep in _SUFFIXES:
            if w.endswith(suf) and len(w) - len(suf) >= 2:
                base = w[: -len(suf)] + rep
                if base in lex and base not in self.stopwords:
                    return lex[base]
        return None

    def __call__(self, doc: LabelledDoc) -> LabelledDoc:
        for m in _WORD.finditer(doc.text):
            concept = self.lookup(m.group())
            if concept is not None:
                doc.token_labels.append((m.start(), m.end(), concept))
        return doc

    def __getstate__(self):  # ship the path, not the dict, to Beam workers
        return {"_path": self._path, "_lexicon": None if self._path else self._lexicon,
                "stopwords": self.stopwords}


def make_labelers(specs: list[str]) -> list:
    """Builds labelers from CLI specs (see module docstring)."""
    out = []
    for spec in specs:
        kind, _, arg = spec.partition(":")
        if kind == "imported":
            out.append(ImportedLabeler())
        elif kind == "metadata":
            fields = {}
            for item in filter(None, arg.split(",")):
                field, eq, prefix = item.partition("=")
                fields[field] = prefix if eq else f"{field}:"
            if not fields:
                raise ValueError(f"labeler {spec!r}: expected metadata:FIELD=PREFIX[,...]")
            out.append(MetadataLabeler(fields))
        elif kind == "lexicon":
            if not arg:
                raise ValueError(f"labeler {spec!r}: expected lexicon:PATH")
            out.append(LexiconLabeler(arg))
        else:
            raise ValueError(f"unknown labeler {spec!r}; expected imported, metadata:..., lexicon:...")
    return out


def apply_labelers(doc: LabelledDoc, labelers: list) -> LabelledDoc:
    """Runs the chain; input labels are dropped unless an ImportedLabeler is present."""
    if not any(getattr(lb, "keeps_input_labels", False) for lb in labelers):
        doc.concepts = []
        doc.spans = [(s, e, []) for s, e, _ in doc.spans]
    for lb in labelers:
        doc = lb(doc)
    return doc
