"""The concept vocabulary: dense ids 0..C-1 with name, description, group, level.

``concepts.json`` is ``{"concepts": [{"id", "name", "description", "group",
"level"}, ...]}`` with ids dense and in order. ``group`` is the kind of concept
(topic, genre, play, section, lexfile, supersense, fact, ...); ``level`` says how it is
labelled: "chunk" (a whole chunk carries it) or "token" (a lexicon labels the
tokens of single words). A vocabulary file given to build_corpus may also be a
bare list of names or of such objects (ids are then assigned in file order).
"""

from __future__ import annotations

import dataclasses
import json

from etils import epath


@dataclasses.dataclass(frozen=True)
class Concept:
    id: int
    name: str
    description: str = ""
    group: str = ""
    level: str = "chunk"


def group_of(name: str) -> str:
    """Default group of a concept name: the part before the first ':'."""
    return name.split(":", 1)[0] if ":" in name else "default"


class ConceptVocab:
    """Name <-> id mapping over dense ids."""

    def __init__(self, concepts: list[Concept]):
        for i, c in enumerate(concepts):
            if c.id != i:
                raise ValueError(f"concept ids must be dense 0..C-1; entry {i} has id {c.id}")
        self.concepts = list(concepts)
        self._by_name = {}
        for c in self.concepts:
            if c.name in self._by_name:
                raise ValueError(f"duplicate concept name {c.name!r} (ids {self._by_name[c.name]}, {c.id})")
            self._by_name[c.name] = c.id

    def __len__(self) -> int:
        return len(self.concepts)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def id(self, name: str) -> int:
        return self._by_name[name]

    def name(self, i: int) -> str:
        return self.concepts[i].name

    @classmethod
    def from_names(cls, names, meta: dict | None = None) -> "ConceptVocab":
        """Vocabulary over ``names`` in the given order; ``meta[name]`` may give
        description/group/level."""
        meta = meta or {}
        out = []
        for i, n in enumerate(names):
            m = meta.get(n, {})
            out.append(Concept(i, n, m.get("description", ""), m.get("group") or group_of(n),
                               m.get("level", "chunk")))
        return cls(out)

    def to_json(self) -> str:
        return json.dumps({"concepts": [dataclasses.asdict(c) for c in self.concepts]},
                          indent=1, sort_keys=True, ensure_ascii=False)

    def save(self, path) -> None:
        epath.Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path) -> "ConceptVocab":
        """Reads concepts.json (or a list of names/objects); errors name the entry."""
        p = epath.Path(path)
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{e.lineno}: malformed JSON ({e.msg}); expected a concept "
                             "vocabulary") from e
        entries = data["concepts"] if isinstance(data, dict) else data
        out = []
        for i, e in enumerate(entries):
            if isinstance(e, str):
                out.append(Concept(i, e, "", group_of(e)))
                continue
            if not isinstance(e, dict) or not isinstance(e.get("name"), str):
                raise ValueError(f"{p}: concept entry {i}: expected a name string or an object "
                                 f"with a 'name' field, got {e!r:.80}")
            if e.get("id", i) != i:
                raise ValueError(f"{p}: concept entry {i}: id {e['id']} is not dense (expected {i})")
            out.append(Concept(i, e["name"], e.get("description", ""),
                               e.get("group") or group_of(e["name"]), e.get("level", "chunk")))
        return cls(out)
