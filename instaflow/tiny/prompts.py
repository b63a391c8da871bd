"""The tiny model's world: product attributes, caption templates, held-out combinations.

Everything the renderer draws and every caption the text encoder reads comes from the
tables below, so `parse_prompt` can tell exactly which prompts the model understands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, asdict
from typing import Iterator

import numpy as np

KINDS = ("mug", "bottle", "box", "sneaker", "lamp", "chair")
# Nouns a caption may use for each kind (the first one is the plain name).
KIND_NOUNS: dict[str, tuple[str, ...]] = {
    "mug": ("mug", "ceramic mug", "coffee mug"),
    "bottle": ("bottle", "water bottle", "glass bottle"),
    "box": ("box", "gift box", "storage box"),
    "sneaker": ("sneaker", "running shoe", "canvas sneaker"),
    "lamp": ("lamp", "desk lamp", "table lamp"),
    "chair": ("chair", "dining chair", "side chair"),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 210, 30),
    "green": (35, 155, 60),
    "blue": (30, 70, 205),
    "purple": (125, 45, 170),
    "pink": (245, 125, 185),
    "black": (28, 28, 30),
}
BACKDROPS: dict[str, tuple[int, int, int]] = {
    "white": (246, 246, 244),
    "light grey": (185, 187, 190),
    "light blue": (165, 205, 240),
    "beige": (228, 208, 168),
    "dark grey": (68, 70, 76),
}
PLACEMENTS = ("left", "center", "right")
SIZES = ("small", "large")
ATTRIBUTES = ("kind", "colour", "backdrop", "placement", "size")
CLASSES: dict[str, tuple[str, ...]] = {
    "kind": KINDS,
    "colour": tuple(COLOURS),
    "backdrop": tuple(BACKDROPS),
    "placement": PLACEMENTS,
    "size": SIZES,
}

PLACEMENT_PHRASES = {"left": ("on the left",), "center": ("centered", "in the center"), "right": ("on the right",)}
TEMPLATES = (
    "{a} {size}{colour} {noun} on {a2} {backdrop} backdrop{place}",
    "studio photo of {a} {size}{colour} {noun}, {backdrop} background{place}",
    "product shot: {a} {size}{colour} {noun} against a {backdrop} wall{place}",
    "a photo of {a} {size}{colour} {noun} on {a2} {backdrop} background{place}",
    "{size}{colour} {noun} on {backdrop}{place}",
)


@dataclass(frozen=True)
class Attributes:
    """What one image shows. placement/size are always drawn; a caption may omit them."""

    kind: str
    colour: str
    backdrop: str
    placement: str
    size: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.kind, self.colour, self.backdrop)


def _is_held_out(kind: str, colour: str, backdrop: str) -> bool:
    # A fixed arithmetic pattern: 24 of the 240 (kind, colour, backdrop) triples, spread so
    # that every kind, colour and backdrop (and every pair of them) still occurs in training.
    k, c, b = KINDS.index(kind), list(COLOURS).index(colour), list(BACKDROPS).index(backdrop)
    return (k + 2 * c + 3 * b) % 10 == 0


def all_combos() -> list[tuple[str, str, str]]:
    return [(k, c, b) for k in KINDS for c in COLOURS for b in BACKDROPS]


HELD_OUT_COMBOS: tuple[tuple[str, str, str], ...] = tuple(x for x in all_combos() if _is_held_out(*x))
TRAIN_COMBOS: tuple[tuple[str, str, str], ...] = tuple(x for x in all_combos() if not _is_held_out(*x))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(
    attrs: Attributes, rng: np.random.Generator, say_placement: bool = True, say_size: bool = True
) -> str:
    """A caption from a random template; placement and size are mentioned only when asked."""
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    noun = KIND_NOUNS[attrs.kind][rng.integers(len(KIND_NOUNS[attrs.kind]))]
    size = f"{attrs.size} " if say_size else ""
    phrases = PLACEMENT_PHRASES[attrs.placement]
    place = f", {phrases[rng.integers(len(phrases))]}" if say_placement else ""
    first = (size or attrs.colour).split()[0]
    text = template.format(
        a=_article(first), size=size, colour=attrs.colour, noun=noun,
        a2=_article(attrs.backdrop), backdrop=attrs.backdrop, place=place,
    )
    return text


def random_attributes(rng: np.random.Generator, combos: tuple[tuple[str, str, str], ...]) -> Attributes:
    kind, colour, backdrop = combos[rng.integers(len(combos))]
    return Attributes(kind, colour, backdrop, PLACEMENTS[rng.integers(3)], SIZES[rng.integers(2)])


def caption_mentions(rng: np.random.Generator, p_mention: float) -> tuple[bool, bool]:
    return bool(rng.random() < p_mention), bool(rng.random() < p_mention)


# -- parsing ---------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+|[,:]")


def _template_words() -> set[str]:
    words: set[str] = set()
    for template in TEMPLATES:
        words.update(_WORD.findall(re.sub(r"\{[a-z0-9]+\}", " ", template)))
    return words


def vocabulary() -> list[str]:
    """Every word (and punctuation token) a caption can contain, sorted."""
    words = _template_words() | {"a", "an"} | set(SIZES)
    for nouns in KIND_NOUNS.values():
        for noun in nouns:
            words.update(noun.split())
    for name in list(COLOURS) + list(BACKDROPS):
        words.update(name.split())
    for phrases in PLACEMENT_PHRASES.values():
        for phrase in phrases:
            words.update(phrase.split())
    return sorted(words)


_VOCAB = frozenset(vocabulary())


def _find_phrase(words: list[str], phrases: list[str], start: int = 0) -> tuple[str, int, int] | None:
    """Longest phrase (as a word sequence) occurring in words[start:]: (phrase, begin, end)."""
    best = None
    for phrase in phrases:
        parts = phrase.split()
        for i in range(start, len(words) - len(parts) + 1):
            if words[i : i + len(parts)] == parts and (best is None or len(parts) > len(best[0].split())):
                best = (phrase, i, i + len(parts))
                break
    return best


def parse_prompt(text: str) -> dict[str, str | None] | None:
    """The attributes a caption asks for, or None if the tiny model cannot read it.

    Returns {"kind", "colour", "backdrop", "placement", "size"}; placement and size are None
    when the caption leaves them open. None when a word is outside the model's vocabulary
    or the kind, the product colour or the backdrop is missing.
    """
    words = _WORD.findall(text.lower())
    if not words or any(w not in _VOCAB for w in words) or len(re.sub(r"[a-z,:\s]", "", text.lower())) > 0:
        return None
    noun_to_kind = {noun: kind for kind, nouns in KIND_NOUNS.items() for noun in nouns}
    noun = _find_phrase(words, list(noun_to_kind))
    if noun is None:
        return None
    # The product colour is the colour word right before the noun; the backdrop comes after.
    colour = words[noun[1] - 1] if noun[1] >= 1 and words[noun[1] - 1] in COLOURS else None
    backdrop = _find_phrase(words, list(BACKDROPS), start=noun[2])
    if colour is None or backdrop is None:
        return None
    size = next((s for s in SIZES if s in words[: noun[1]]), None)
    rest = " ".join(words[backdrop[2] :])
    placement = None
    for name, phrases in PLACEMENT_PHRASES.items():
        if any(phrase in rest for phrase in phrases):
            placement = name
    return {"kind": noun_to_kind[noun[0]], "colour": colour, "backdrop": backdrop[0], "placement": placement, "size": size}


def held_out_prompts(n_per_combo: int = 4, seed: int = 1234) -> Iterator[tuple[str, dict[str, str | None]]]:
    """Evaluation prompts over the held-out combinations (half of them name placement and size)."""
    rng = np.random.default_rng(seed)
    for combo in HELD_OUT_COMBOS:
        for j in range(n_per_combo):
            attrs = Attributes(*combo, PLACEMENTS[rng.integers(3)], SIZES[rng.integers(2)])
            say = j % 2 == 0
            caption = make_caption(attrs, rng, say_placement=say, say_size=say)
            yield caption, parse_prompt(caption)  # type: ignore[misc]
