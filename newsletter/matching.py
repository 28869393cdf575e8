"""Match a day's papers against readers' interest keywords, and rank what matched.

This module is pure (no I/O, no database) so that the expensive part of a daily run -- matching
every reader against every new entry -- can be tested, benchmarked and parallelised on its own.

How a keyword matches
---------------------
Text is split into words; each word is folded (accents and LaTeX accent escapes removed, case
folded) and stemmed with the Snowball English stemmer, so *quantized* and *quantization* meet,
while *quantum* does not. Because words are compared whole, ``rag`` never matches *fragment*.
Each pair of neighbouring words joined by a hyphen or a space (unless one is a function word such
as *a* or *on*) is also indexed as one word, and a keyword may likewise be read with neighbouring
words glued together; that is what makes ``bi-level``, ``bilevel`` and ``bi level``
interchangeable. A phrase matches when its words occur
at consecutive positions of the same field; clause punctuation (``. , ; : ! ?``) breaks adjacency.
A small acronym table (:data:`DEFAULT_SYNONYMS`, extensible by the operator) lets ``LLM`` match
*large language models* and the other way round.

Why bitsets
-----------
A daily run matches up to ~10^5 profiles against ~10^3 entries. :class:`MatchIndex` therefore
indexes the entries once, and turns each distinct keyword, once, into two Python ``int`` bitsets
over the entries (title, summary). A profile is then scored with a handful of big-integer
operations per keyword (a bit-sliced adder) whose cost does not depend on how many entries
matched, and only the ``max_items`` winners are ever materialised as Python objects.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from array import array
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import accumulate, compress, pairwise, repeat
from operator import and_, lshift, or_
from types import MappingProxyType
from typing import NamedTuple, cast

__all__ = [
    "DEFAULT_SYNONYMS",
    "MAX_KEYWORD_LENGTH",
    "Doc",
    "Hit",
    "MatchIndex",
    "Pick",
    "Profile",
    "highlight",
    "match",
    "validate_keyword",
]

try:
    import Stemmer as _pystemmer

    _raw_stem: Callable[[str], str] = _pystemmer.Stemmer("english").stemWord
except ImportError:  # pragma: no cover - exercised only where the C stemmer is missing
    import snowballstemmer

    _raw_stem = snowballstemmer.stemmer("english").stemWord


@dataclass(frozen=True, slots=True)
class Doc:
    """One entry of the day, as far as matching cares."""

    id: int
    title: str
    summary: str
    published: datetime | None


@dataclass(frozen=True, slots=True)
class Profile:
    """What one reader wants: keywords (any one suffices), vetoes, and a cap on the digest."""

    keywords: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    max_items: int = 10


class Hit(NamedTuple):
    """Why an entry was picked: which keyword (as the reader typed it) matched, and where.
    A tuple, as sending keys its caches on a pick's hits (one per paper shown)."""

    keyword: str
    in_title: bool
    in_summary: bool


class Pick(NamedTuple):
    """One entry chosen for a reader; ``hits`` are strongest first so templates can cut them.
    A tuple: matching makes ten for each of 100,000 readers, and a frozen dataclass's
    `__init__` was a tenth of the time of `MatchIndex.match`."""

    doc_id: int
    score: float
    hits: tuple[Hit, ...]


# Acronyms that are near-unambiguous in research-paper abstracts. Ambiguous ones (CV, MD, QA,
# DL...) are left out on purpose: an acronym here makes its expansion match it, for everyone.
DEFAULT_SYNONYMS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "ai": ("artificial intelligence",),
        "ml": ("machine learning",),
        "llm": ("large language model",),
        "vlm": ("vision-language model",),
        "nlp": ("natural language processing",),
        "rag": ("retrieval-augmented generation",),
        "rl": ("reinforcement learning",),
        "rlhf": ("reinforcement learning from human feedback",),
        "dpo": ("direct preference optimization",),
        "lora": ("low-rank adaptation",),
        "moe": ("mixture of experts",),
        "ssl": ("self-supervised learning",),
        "gnn": ("graph neural network",),
        "cnn": ("convolutional neural network",),
        "rnn": ("recurrent neural network",),
        "snn": ("spiking neural network",),
        "mlp": ("multilayer perceptron",),
        "vit": ("vision transformer",),
        "nas": ("neural architecture search",),
        "gan": ("generative adversarial network",),
        "vae": ("variational autoencoder",),
        "ebm": ("energy-based model",),
        "ddpm": ("denoising diffusion probabilistic model",),
        "nerf": ("neural radiance field",),
        "pinn": ("physics-informed neural network",),
        "ode": ("ordinary differential equation",),
        "sde": ("stochastic differential equation",),
        "pde": ("partial differential equation",),
        "gp": ("gaussian process",),
        "bo": ("bayesian optimization",),
        "sgd": ("stochastic gradient descent",),
        "mcmc": ("markov chain monte carlo",),
        "smc": ("sequential monte carlo",),
        "hmc": ("hamiltonian monte carlo",),
        "ot": ("optimal transport",),
        "dft": ("density functional theory",),
    }
)

MAX_KEYWORD_LENGTH = 80

# Weights of one keyword's hit; title hits count double because a title is the author's own
# one-line summary. Integers, so scores can be summed in bit-sliced form (see MatchIndex.match).
_TITLE_WEIGHT = 2
_SUMMARY_WEIGHT = 1

# ---------------------------------------------------------------------------------------------
# Tokenising and normalising words
# ---------------------------------------------------------------------------------------------

# LaTeX accent escapes (Schr\"odinger, Schr{\"o}dinger) are part of the word they sit in; arXiv
# abstracts are full of them and splitting there would break "Schrödinger" into two words.
_ACCENT = r"""\\["'`^~=.]\{?[A-Za-z]\}?|\{\\["'`^~=.][A-Za-z]\}"""
_WORD_RE = re.compile(rf"(?:[^\W_]+|{_ACCENT})+(?:['’](?:[^\W_]+|{_ACCENT})+)*")
_SPLIT_RE = re.compile(f"({_WORD_RE.pattern})")
# `_SPLIT_RE` for a text without a backslash, where its LaTeX alternatives cannot match: the
# same words, split in two thirds of the time.
_PLAIN_SPLIT_RE = re.compile(r"([^\W_]+(?:['’][^\W_]+)*)")
_ACCENT_RE = re.compile(r"""\{?\\["'`^~=.]\{?([A-Za-z])\}?\}?""")
_NON_ALNUM_RE = re.compile(r"[\W_]+")
# Words separated only by a hyphen, or by a space, may also be read as one word:
# bi-level ~ bilevel ~ bi level. Across a space, not when a piece is a function word, or
# "a long" would match "along" and "on line" "online".
_HYPHEN_RE = re.compile(r"\s*[-‐‑]\s*")
_NO_GLUE = frozenset(
    "a an and are as at be by do for from he her his if in is it its no not of on or so the "  # noqa: SIM905
    "to up we with".split()
)
# Clause punctuation followed by a space ends a run of adjacent words; "e.g." or "3.5" do not.
_BREAK_RE = re.compile(r"[.,;:!?][\s\"')\]}]*\s")
# "LLMs", "NeRFs", "PDEs": an acronym's plural, which Snowball would not strip.
_ACRONYM_PLURAL_RE = re.compile(r"(?=(?:[^A-Z]*[A-Z]){2})[A-Za-z0-9]*[A-Z0-9]s")
_VOWELS = frozenset("aeiouy")

_memo_lock = threading.Lock()  # PyStemmer objects are not thread-safe.
_STEM_MEMO: dict[str, str] = {}
_SURFACE_MEMO: dict[str, tuple[str, str]] = {}
_MEMO_LIMIT = 500_000  # stop a long-running web process from growing without bound


def _fold(word: str) -> str:
    """Lower-case a word, dropping accents, LaTeX escapes, apostrophes and possessive 's."""
    if word.isascii() and word.isalnum():
        return word.lower()
    if "\\" in word:
        word = _ACCENT_RE.sub(r"\1", word)
    word = unicodedata.normalize("NFKD", word)
    word = "".join(c for c in word if not unicodedata.combining(c)).casefold()
    if word.endswith(("'s", "’s")):
        word = word[:-2]
    return _NON_ALNUM_RE.sub("", word)


def _stem(folded: str) -> str:
    """Snowball stem, plus plural stripping for vowel-less acronyms ("gnns", "gps")."""
    term = _STEM_MEMO.get(folded)
    if term is not None:
        return term
    with _memo_lock:
        term = _raw_stem(folded)
    if (
        len(term) >= 3
        and term[-1] == "s"
        and term[-2] != "s"
        and not any(c in _VOWELS for c in term[:-1])
    ):
        term = term[:-1]
    if len(_STEM_MEMO) >= _MEMO_LIMIT:
        _STEM_MEMO.clear()
    _STEM_MEMO[folded] = term
    return term


def _surface(word: str) -> tuple[str, str]:
    """(folded form, index term) of a word as it appears in text."""
    info = _SURFACE_MEMO.get(word)
    if info is not None:
        return info
    folded = _fold(word)
    if _ACRONYM_PLURAL_RE.fullmatch(word):
        info = (folded, _stem(folded[:-1]))
    else:
        info = (folded, _stem(folded))
    if len(_SURFACE_MEMO) >= _MEMO_LIMIT:
        _SURFACE_MEMO.clear()
    _SURFACE_MEMO[word] = info
    return info


# (folded form, index term, start offset, end offset, word position, may glue to previous word).
# Positions jump by 2 across a clause break, so phrases never match across one.
_Token = tuple[str, str, int, int, int, bool]


# What separates two words, as far as positions and gluing go: white space (they may glue
# unless one is a function word), a clause break (positions jump by 2), a hyphen (they may
# glue), anything else. Kept by gap, as a day's texts have few distinct gaps.
_SPACE, _BREAK, _HYPHEN, _OTHER = range(4)
_GAP_KINDS: dict[str, int] = {" ": _SPACE}


def _gap_kind(gap: str) -> int:
    kind = _GAP_KINDS.get(gap)
    if kind is None:
        if gap.isspace():
            kind = _SPACE
        elif _BREAK_RE.search(gap) is not None:
            kind = _BREAK
        elif _HYPHEN_RE.fullmatch(gap) is not None:
            kind = _HYPHEN
        else:
            kind = _OTHER
        if len(_GAP_KINDS) >= _MEMO_LIMIT:
            _GAP_KINDS.clear()
            _GAP_KINDS[" "] = _SPACE
        _GAP_KINDS[gap] = kind
    return kind


def _split(text: str) -> list[str]:
    """[gap, word, gap, word, ..., gap]: splitting with a capturing group is markedly faster
    than walking match objects."""
    return (_SPLIT_RE if "\\" in text else _PLAIN_SPLIT_RE).split(text)


def _tokens(text: str) -> Iterator[_Token]:
    """The words of `text`, by the rules above. The reference for `_postings_of_text`, which
    indexes whole texts faster, and what keywords and single texts are read with."""
    parts = _split(text)
    surface_memo = _SURFACE_MEMO
    pos = -1
    offset = len(parts[0])
    gap = parts[0]
    prev = ""
    for i in range(1, len(parts), 2):
        word = parts[i]
        start = offset
        offset += len(word)
        if gap.endswith("\\"):
            # A LaTeX control word such as \em or \textbf is markup, not a word; fold it into the
            # gap so that it still separates (never glues) its neighbours.
            gap = gap + word + parts[i + 1] + "\x00"
            offset += len(parts[i + 1])
            continue
        info = surface_memo.get(word)
        folded, term = info if info is not None else _surface(word)
        if not folded:
            gap = gap + word + parts[i + 1] + "\x00"
            offset += len(parts[i + 1])
            continue
        if pos < 0:
            joins = False
            pos = 0
        else:
            kind = _gap_kind(gap)
            if kind == _SPACE:
                joins = folded not in _NO_GLUE and prev not in _NO_GLUE
                pos += 1
            elif kind == _BREAK:
                joins = False
                pos += 2
            else:
                joins = kind == _HYPHEN
                pos += 1
        yield folded, term, start, offset, pos, joins
        prev = folded
        gap = parts[i + 1]
        offset += len(gap)


# Per text: term -> bitmask of its word positions, for single words and for glued pairs (keyed
# by the pair's first position).
_Postings = tuple[dict[str, int], dict[str, int]]


def _postings(tokens: Iterable[_Token]) -> _Postings:
    """A text's postings from its tokens: the reference `_postings_of_text` is tested against,
    and what it uses for the texts it leaves to `_tokens`."""
    uni: dict[str, int] = {}
    bi: dict[str, int] = {}
    prev_folded = ""
    for folded, term, _, _, pos, joins in tokens:
        bit = 1 << pos
        uni[term] = uni.get(term, 0) | bit
        if joins:
            glued_term = _stem(prev_folded + folded)
            bi[glued_term] = bi.get(glued_term, 0) | (bit >> 1)
        prev_folded = folded
    return uni, bi


def _postings_of_text(text: str, with_offsets: bool) -> tuple[_Postings, _Offsets | None]:
    """`_postings(_tokens(text))` and, if asked, the words' offsets, with fewer steps per
    word: the index of a day's papers is built from these before anyone can be matched, and
    in `send` before the helper processes can start. Where it can, a step runs over all the
    words at once (the split, a map over the word memo, running sums of lengths) rather than
    word by word through a generator; the whole index of 2,000 papers was built in 0.60 s
    instead of 0.69 s (medians of 15 alternating builds). A text where a word is dropped (a
    LaTeX control word, or one that folds to nothing) takes `_tokens`, as positions then no
    longer follow the words one to one. Tested against `_tokens` on any text."""
    parts = _split(text)
    words = parts[1::2]
    if not words:
        return ({}, {}), (_Offsets.of(()) if with_offsets else None)
    known = list(map(_SURFACE_MEMO.get, words))
    infos: list[tuple[str, str]] = (
        [i if i is not None else _surface(w) for i, w in zip(known, words, strict=True)]
        if None in known
        else cast("list[tuple[str, str]]", known)
    )
    folded = [info[0] for info in infos]
    if "" in folded or ("\\" in text and any(gap.endswith("\\") for gap in parts[:-1:2])):
        tokens = list(_tokens(text))
        return _postings(tokens), (_Offsets.of(tokens) if with_offsets else None)
    kinds = _GAP_KINDS
    no_glue = _NO_GLUE
    stem_memo = _STEM_MEMO
    uni: dict[str, int] = {infos[0][1]: 1}
    bi: dict[str, int] = {}
    breaks: list[int] = []  # the positions of the words that follow a clause break
    pos = 0
    prev = folded[0]
    prev_glues = prev not in no_glue
    for word, info, gap in zip(folded[1:], infos[1:], parts[2:-1:2], strict=True):
        pos += 1
        glues = word not in no_glue
        if gap == " ":  # most gaps: looked at first, and without the table
            joins = glues and prev_glues
        else:
            kind = kinds.get(gap)
            if kind is None:
                kind = _gap_kind(gap)
            if kind == 0:  # _SPACE (literals: this loop runs for every word of the day)
                joins = glues and prev_glues
            elif kind == 1:  # _BREAK
                pos += 1
                breaks.append(pos)
                joins = False
            else:
                joins = kind == 2  # _HYPHEN
        bit = 1 << pos
        term = info[1]
        uni[term] = uni.get(term, 0) | bit
        if joins:
            glued = prev + word
            glued_term = stem_memo.get(glued)
            if glued_term is None:
                glued_term = _stem(glued)
            bi[glued_term] = bi.get(glued_term, 0) | (bit >> 1)
        prev = word
        prev_glues = glues
    if not with_offsets:
        return (uni, bi), None
    ends = list(accumulate(map(len, parts)))  # ends[j]: where parts[j] ends
    starts = [0] * (pos + 1)
    stops = [0] * (pos + 1)
    first = 0  # word `first` starts a run of words at positions shifted by `shift`
    # the j-th break (from 0) moves the words after it j + 1 further: that word is at its
    # position less j + 1
    jumps = [at - j - 1 for j, at in enumerate(breaks)]
    for shift, stop in enumerate([*jumps, len(words)]):
        starts[first + shift : stop + shift] = ends[2 * first : 2 * stop : 2]
        stops[first + shift : stop + shift] = ends[2 * first + 1 : 2 * stop : 2]
        first = stop
    return (uni, bi), _Offsets(array("I", starts), array("I", stops))


# A compiled phrase: the term of each word, and the term of each neighbouring pair glued
# together (merged[j] glues words j and j+1).
_Phrase = tuple[tuple[str, ...], tuple[str | None, ...]]


def _phrase(text: str) -> _Phrase | None:
    toks = list(_tokens(text))
    if not toks:
        return None
    singles = tuple(t[1] for t in toks)
    merged = tuple(_stem(a[0] + b[0]) if b[5] else None for a, b in pairwise(toks))
    return singles, merged


def _canon(phrase: _Phrase) -> str:
    # Glued terms, so "self-supervised learning" and "selfsupervised learning" look alike.
    return "".join(phrase[0])


class _Synonyms:
    """Keyword alternatives: an acronym brings its expansions; an expansion brings its acronym.

    Deliberately one hop: "density functional theory" brings "DFT" but not every other meaning
    that an operator may have given "DFT".
    """

    __slots__ = ("_alts",)

    def __init__(self, table: Mapping[str, Iterable[str]]) -> None:
        alts: dict[str, list[_Phrase]] = {}
        for short, expansions in table.items():
            short_phrase = _phrase(short)
            if short_phrase is None:
                continue
            if isinstance(expansions, str):  # a lone string is a common config slip
                expansions = (expansions,)
            for expansion in expansions:
                long_phrase = _phrase(expansion)
                if long_phrase is None:
                    continue
                alts.setdefault(_canon(short_phrase), []).append(long_phrase)
                alts.setdefault(_canon(long_phrase), []).append(short_phrase)
        self._alts = alts

    def alternatives(self, keyword: str) -> list[_Phrase]:
        phrase = _phrase(keyword)
        if phrase is None:
            return []
        out = [phrase]
        for alt in self._alts.get(_canon(phrase), ()):
            if alt not in out:
                out.append(alt)
        return out


def _merge_tables(synonyms: Mapping[str, Iterable[str]] | None) -> dict[str, Iterable[str]]:
    by_canon: dict[str, tuple[str, Iterable[str]]] = {}
    for table in (DEFAULT_SYNONYMS, synonyms or {}):
        for key, values in table.items():
            phrase = _phrase(key)
            if phrase is not None:
                # Matched up by canonical form so that an operator's "LLM" replaces the built-in
                # "llm"; an empty list therefore switches a built-in entry off.
                by_canon[_canon(phrase)] = (key, values)
    return dict(by_canon.values())


_default_synonyms: _Synonyms | None = None
_last_custom: tuple[Mapping[str, Iterable[str]], _Synonyms] | None = None


def _synonyms_for(synonyms: Mapping[str, Iterable[str]] | None) -> _Synonyms:
    """Built tables are cached so that highlighting many items does not rebuild them."""
    global _default_synonyms, _last_custom
    if not synonyms:
        if _default_synonyms is None:
            _default_synonyms = _Synonyms(_merge_tables(None))
        return _default_synonyms
    cached = _last_custom
    if cached is not None and cached[0] is synonyms:
        return cached[1]
    built = _Synonyms(_merge_tables(synonyms))
    _last_custom = (synonyms, built)
    return built


# ---------------------------------------------------------------------------------------------
# Per-field inverted index
# ---------------------------------------------------------------------------------------------


def _iter_bits(bits: int) -> Iterator[int]:
    """The positions of the set bits of a non-negative int, lowest first. Read from its binary
    digits as text: taking the lowest bit off a 2,000-bit set (`bits & -bits`) makes three
    new 2,000-bit ints per bit, and a phrase's candidate entries are walked this way for every
    phrase a reader types."""
    digits = bin(bits)[:1:-1]  # lowest first, without the "0b"
    at = digits.find("1")
    while at >= 0:
        yield at
        at = digits.find("1", at + 1)


class _SlotZero:
    """The postings of a term in a one-text field: reads like ``{0: positions}``."""

    __slots__ = ("positions",)

    def __init__(self, positions: int) -> None:
        self.positions = positions

    def get(self, slot: int, default: int = 0) -> int:
        return self.positions if slot == 0 else default

    def __iter__(self) -> Iterator[int]:
        return iter((0,))


class _Field:
    """Positional postings of one field (title or summary) over all docs, addressed by slot.

    Word positions of a term within one slot are kept as an ``int`` bitmask, so that checking a
    phrase is a few shifts and ANDs instead of a loop over positions.
    """

    __slots__ = ("_bi", "_bits", "_plans", "_uni")

    def __init__(self) -> None:
        # term -> slot -> position bitmask; _bi holds glued pairs, keyed by their first position.
        self._uni: dict[str, dict[int, int]] = {}
        self._bi: dict[str, dict[int, int]] = {}
        self._bits: dict[str, int] = {}
        self._plans: dict[_Phrase, _Plan] = {}

    def add(self, slot: int, postings_of_text: _Postings) -> None:
        uni, bi = postings_of_text
        for postings, local in ((self._uni, uni), (self._bi, bi)):
            for term, positions in local.items():
                by_slot = postings.get(term)
                if by_slot is None:
                    postings[term] = {slot: positions}
                else:
                    by_slot[slot] = positions

    def compact_single_slot(self) -> None:
        """For a field of one text (slot 0), as highlighting builds: each term's
        ``{0: positions}`` dict becomes a `_SlotZero`, a quarter of the memory."""
        for postings in (self._uni, self._bi):
            for term, by_slot in postings.items():
                postings[term] = _SlotZero(by_slot.get(0, 0))  # type: ignore[assignment]

    def term_bits(self, term: str) -> int:
        """Slots whose field contains `term` as a word or as a glued pair of words."""
        bits = self._bits.get(term)
        if bits is None:
            bits = 0
            for postings in (self._uni, self._bi):
                for slot in postings.get(term, ()):
                    bits |= 1 << slot
            self._bits[term] = bits
        return bits

    def phrase_bits(self, phrase: _Phrase) -> int:
        """Slots in which the phrase occurs."""
        singles, merged = phrase
        n = len(singles)
        if n == 1:
            return self.term_bits(singles[0])
        # Cheap prefilter with bitsets: every word must be covered by itself or a glued pair.
        candidates = -1
        for j in range(n):
            cover = self.term_bits(singles[j])
            for glued in merged[max(j - 1, 0) : j + 1]:
                if glued is not None:
                    cover |= self.term_bits(glued)
            candidates &= cover
            if not candidates:
                return 0
        plan = self._plan(phrase)
        if n == 2:  # most phrases: `_ends` unrolled, and run over all candidates at once
            return _two_word_bits(plan, list(_iter_bits(candidates)))
        found = [slot for slot in _iter_bits(candidates) if _ends(plan, slot, -1)]
        return sum(1 << slot for slot in found)

    def _plan(self, phrase: _Phrase) -> _Plan:
        """Per word of the phrase: the postings that may consume it, and how many words each eats.

        Looked up once per phrase rather than once per candidate slot, and kept: a send run
        highlights each phrase in every paper it is shown in, and making its plan again each
        time was a tenth of highlighting (cProfile); with plans kept, highlighting took 5-8%
        less time, in alternation.
        """
        plan = self._plans.get(phrase)
        if plan is None:
            plan = self._plans[phrase] = self._new_plan(phrase)
        return plan

    def _new_plan(self, phrase: _Phrase) -> _Plan:
        singles, merged = phrase
        plan: list[list[tuple[int, int, dict[int, int]]]] = []
        for j, term in enumerate(singles):
            steps = []
            for width, t in ((1, term), (2, merged[j] if j < len(merged) else None)):
                if t is None:
                    continue
                for shift, postings in ((1, self._uni), (2, self._bi)):
                    by_slot = postings.get(t)
                    if by_slot is not None:
                        steps.append((width, shift, by_slot))
            plan.append(steps)
        return plan

    def phrase_spans(self, phrase: _Phrase, slot: int) -> list[tuple[int, int]]:
        """Word-position spans [start, end) of every occurrence of the phrase in one slot."""
        if len(phrase[0]) == 1:  # one word (most keywords): itself, or a glued pair of words
            uni = self._uni.get(phrase[0][0])
            bi = self._bi.get(phrase[0][0])
            alone = uni.get(slot, 0) if uni is not None else 0
            glued = bi.get(slot, 0) if bi is not None else 0
            spans = []
            for start in _iter_bits(alone | glued):
                if alone >> start & 1:
                    spans.append((start, start + 1))
                if glued >> start & 1:
                    spans.append((start, start + 2))
            return spans
        plan = self._plan(phrase)
        if not _ends(plan, slot, -1):
            return []
        starts = 0
        for _, _, by_slot in plan[0]:
            starts |= by_slot.get(slot, 0)
        return [
            (start, end)
            for start in _iter_bits(starts)
            for end in _iter_bits(_ends(plan, slot, 1 << start))
        ]


# For each word of a phrase: (words consumed, positions advanced, slot -> position bitmask).
_Plan = list[list[tuple[int, int, dict[int, int]]]]


def _two_word_bits(plan: _Plan, slots: list[int]) -> int:
    """The slots among `slots` in which a two-word phrase occurs: `_ends` for each slot,
    unrolled, with each of its steps taken for every slot at once (`map` over the postings,
    with no Python step per slot): a phrase with common words has hundreds of candidate
    entries, and resolving each phrase a reader types is on the way to matching anyone.
    The benchmark's 2,984 keywords resolved in 0.21 s instead of 0.27 s (best of five)."""
    first, second = plan
    found: set[int] = set()
    after: list[int] | None = None  # per slot, where the second word may start
    for width, shift, by_slot in first:
        hits = list(map(by_slot.get, slots, repeat(0)))
        if width == 2:  # both words at once, as one glued term
            found.update(compress(slots, hits))
        elif after is None:
            after = list(map(lshift, hits, repeat(shift)))
        else:
            after = list(map(or_, after, map(lshift, hits, repeat(shift))))
    if after is not None:
        for _, _, by_slot in second:
            found.update(compress(slots, map(and_, map(by_slot.get, slots, repeat(0)), after)))
    return sum(map(lshift, repeat(1), found))


def _ends(plan: _Plan, slot: int, starts: int) -> int:
    """Bitmask of positions just past an occurrence of the phrase beginning in `starts`.

    Dynamic programming over the phrase's words: a step consumes one word (its own term) or
    two (their glued term), and either may match one word or a glued pair in the text.
    """
    n = len(plan)
    reach = [0] * (n + 1)  # reach[j]: positions where word j of the phrase may start
    reach[0] = starts
    for j, steps in enumerate(plan):
        frontier = reach[j]
        if frontier:
            for width, shift, by_slot in steps:
                hit = by_slot.get(slot, 0) & frontier
                if hit:
                    reach[j + width] |= hit << shift
    return reach[n]


# ---------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Keyword:
    """One keyword as typed, resolved against one index."""

    canon: frozenset[str]  # equal for keywords that differ only in spelling or by synonym
    title: int  # bitset over slots
    summary: int
    any: int
    hits: tuple[Hit, Hit, Hit]  # prebuilt explanations: in both fields, title only, summary only


def _recency_key(doc: Doc) -> tuple[int, float, int]:
    published = doc.published
    if published is None:
        return (1, 0.0, doc.id)
    if published.tzinfo is None:
        published = published.replace(tzinfo=UTC)
    return (0, -published.timestamp(), doc.id)


class MatchIndex:
    """Index a day's entries ONCE; then look each profile up (no per-profile scan of every entry).

    `synonyms` extends :data:`DEFAULT_SYNONYMS` (acronym -> expansions); an entry whose key
    matches a built-in one replaces it, and an empty list switches it off.

    Entries are stored in "slots" ordered by rank tie-break (newest first, then id), so that the
    lowest set bit of a bitset is always the entry that should win a tie. Each distinct keyword is
    resolved once per index and memoised, since many readers share keywords.
    """

    def __init__(
        self,
        docs: Iterable[Doc],
        synonyms: Mapping[str, Iterable[str]] | None = None,
        *,
        highlights: bool = False,
    ) -> None:
        """`highlights`: keep where each word is while indexing, for an index that will
        highlight most of its papers (`ranges`), as `send`'s planner does; otherwise a paper's
        words are found again the first time one of its texts is highlighted."""
        unique: dict[int, Doc] = {}
        for doc in docs:
            unique.setdefault(doc.id, doc)  # an id is a primary key: keep its first version
        ordered = sorted(unique.values(), key=_recency_key)
        self._ids: tuple[int, ...] = tuple(doc.id for doc in ordered)
        self._slots = {doc_id: slot for slot, doc_id in enumerate(self._ids)}
        self._title = _Field()
        self._summary = _Field()
        # Summaries are indexed with their white space collapsed, as emails show them
        # (`render.shorten`): the same words and word positions, so the same matches, and
        # character offsets that hold in the email's text (see `ranges`).
        self._texts: list[tuple[str, str]] = []
        # (slot, in title) -> where each word is, for highlighting (see `highlights`: for
        # every paper, finding the words again cost 0.5 s, nearly as much as this loop).
        self._offsets: dict[tuple[int, bool], _Offsets] = {}
        for slot, doc in enumerate(ordered):
            title, summary = doc.title or "", " ".join((doc.summary or "").split())
            self._texts.append((title, summary))
            for field, text, in_title in (
                (self._title, title, True),
                (self._summary, summary, False),
            ):
                postings, offsets = _postings_of_text(text, highlights)
                field.add(slot, postings)
                if offsets is not None:
                    self._offsets[slot, in_title] = offsets
        self._synonyms = _synonyms_for(synonyms)
        self._alternatives: dict[str, list[_Phrase]] = {}
        self._keywords: dict[str, _Keyword | None] = {}  # by keyword exactly as typed
        self._resolved: dict[str, tuple[frozenset[str], int, int] | None] = {}  # by normal form

    def __len__(self) -> int:
        return len(self._ids)

    def text(self, doc_id: int, title: bool) -> str | None:
        """A doc's title, or its summary with white space collapsed, as indexed."""
        slot = self._slots.get(doc_id)
        return None if slot is None else self._texts[slot][0 if title else 1]

    def ranges(self, doc_id: int, title: bool, keyword: str) -> tuple[tuple[int, int], ...]:
        """Character ranges where `keyword` occurs in the doc's title or summary (`text`):
        `highlight`'s ranges, from this index rather than from analysing the text anew."""
        slot = self._slots[doc_id]
        offsets = self._offsets.get((slot, title))
        if offsets is None:
            text = self._texts[slot][0 if title else 1]
            offsets = self._offsets[slot, title] = _Offsets.of(list(_tokens(text)))
        alternatives = self._alternatives.get(keyword)
        if alternatives is None:
            alternatives = self._alternatives[keyword] = self._synonyms.alternatives(keyword)
        return _keyword_ranges(self._title if title else self._summary, offsets, alternatives, slot)

    def _keyword(self, keyword: str) -> _Keyword | None:
        try:
            return self._keywords[keyword]
        except KeyError:
            pass
        normal = " ".join(keyword.split()).casefold()
        try:
            resolved = self._resolved[normal]
        except KeyError:
            resolved = None
            alternatives = self._synonyms.alternatives(keyword)
            if alternatives:
                title = summary = 0
                for alt in alternatives:
                    title |= self._title.phrase_bits(alt)
                    summary |= self._summary.phrase_bits(alt)
                resolved = (frozenset(_canon(alt) for alt in alternatives), title, summary)
            self._resolved[normal] = resolved
        entry = None
        if resolved is not None:
            canon, title, summary = resolved
            hits = (
                Hit(keyword, True, True),
                Hit(keyword, True, False),
                Hit(keyword, False, True),
            )
            entry = _Keyword(canon, title, summary, title | summary, hits)
        self._keywords[keyword] = entry
        return entry

    def match(self, profile: Profile, *, exclude_ids: Container[int] = frozenset()) -> list[Pick]:
        """Best entries for one profile, strongest first; [] when nothing matches.

        Score = sum over distinct matching keywords of 2 (in title) + 1 (in summary), so a title
        hit outweighs a summary hit and two keywords outweigh one in the same places. Ties go to
        the newer entry, then the lower id. Keywords that are the same modulo spelling or
        synonyms ("LLM", "LLMs", "large language model") count once, under the first one given.
        """
        limit = profile.max_items
        if limit <= 0:
            return []
        memo = self._keywords
        keywords: list[_Keyword] = []
        seen: set[frozenset[str]] = set()
        alive = 0
        for keyword in profile.keywords:
            kw = memo[keyword] if keyword in memo else self._keyword(keyword)
            if kw is None or not kw.any or kw.canon in seen:
                continue
            seen.add(kw.canon)
            keywords.append(kw)
            alive |= kw.any
        if not alive:
            return []
        for keyword in profile.exclude:
            kw = memo[keyword] if keyword in memo else self._keyword(keyword)
            if kw is not None and kw.any:
                alive &= ~kw.any
                if not alive:
                    return []

        # Bit-sliced sum of per-keyword weights: planes[i] holds bit i of every slot's score.
        planes: list[int] = [0, 0]
        for kw in keywords:
            for carry, level in ((kw.summary, 0), (kw.title, 1)):
                while carry:
                    if level == len(planes):
                        planes.append(carry)
                        break
                    plane = planes[level]
                    planes[level] = plane ^ carry
                    carry &= plane
                    level += 1

        chosen: list[int] = []  # single-bit masks of chosen slots, best first
        chosen_mask = 0
        ids = self._ids
        while alive and len(chosen) < limit:
            # Slots sharing the highest score among those left: descend the planes greedily.
            best = alive
            for plane in reversed(planes):
                narrowed = best & plane
                if narrowed:
                    best = narrowed
            alive ^= best
            while best:
                low = best & -best
                best ^= low
                if ids[low.bit_length() - 1] in exclude_ids:
                    continue
                chosen.append(low)
                chosen_mask |= low
                if len(chosen) == limit:
                    break

        # Explain the winners, strongest hits first: in both fields, title only, summary only.
        active = [(kw.title, kw.summary, kw.hits) for kw in keywords if kw.any & chosen_mask]
        picks: list[Pick] = []
        for low in chosen:
            score = n_both = n_title = 0
            explained: list[Hit] = []  # [in both fields..., title only..., summary only...]
            for title, summary, hits in active:
                if title & low:
                    if summary & low:
                        score += _TITLE_WEIGHT + _SUMMARY_WEIGHT
                        explained.insert(n_both, hits[0])
                        n_both += 1
                    else:
                        score += _TITLE_WEIGHT
                        explained.insert(n_both + n_title, hits[1])
                        n_title += 1
                elif summary & low:
                    score += _SUMMARY_WEIGHT
                    explained.append(hits[2])
            picks.append(Pick(ids[low.bit_length() - 1], float(score), tuple(explained)))
        return picks


def match(
    docs: Iterable[Doc],
    profile: Profile,
    synonyms: Mapping[str, Iterable[str]] | None = None,
) -> list[Pick]:
    """One-off convenience; build a MatchIndex yourself when matching more than one profile."""
    return MatchIndex(docs, synonyms).match(profile)


Segments = list[tuple[str, bool]]


class _Offsets:
    """Character offsets of each word position of one text, in two compact arrays (a run
    keeps thousands of analysed texts; a dict of tuples cost four times the memory)."""

    __slots__ = ("ends", "starts")

    def __init__(self, starts: array[int], ends: array[int]) -> None:
        self.starts = starts
        self.ends = ends

    @classmethod
    def of(cls, tokens: Sequence[_Token]) -> _Offsets:
        size = tokens[-1][4] + 1 if tokens else 0  # positions skip one across a clause break
        starts, ends = [0] * size, [0] * size
        for tok in tokens:
            starts[tok[4]] = tok[2]
            ends[tok[4]] = tok[3]
        return cls(array("I", starts), array("I", ends))


def _analyse(text: str) -> tuple[_Field, _Offsets]:
    """A one-slot index of `text`, and each word position's character offsets."""
    field = _Field()
    postings, offsets = _postings_of_text(text, True)
    assert offsets is not None
    field.add(0, postings)
    field.compact_single_slot()
    return field, offsets


def _keyword_ranges(
    field: _Field, offsets: _Offsets, alternatives: Iterable[_Phrase], slot: int = 0
) -> tuple[tuple[int, int], ...]:
    """Character ranges where any of a keyword's alternatives occurs in one slot's text."""
    if not offsets.starts:
        return ()
    return tuple(
        (offsets.starts[start], offsets.ends[end - 1])
        for alt in alternatives
        for start, end in field.phrase_spans(alt, slot)
    )


Marks = tuple[tuple[int, int], ...]


def merge_marks(ranges: list[tuple[int, int]]) -> Marks:
    """Ranges sorted, with overlapping or touching ones joined: what a reader sees marked."""
    if len(ranges) < 2:
        return tuple(ranges)
    ranges.sort()
    merged: list[tuple[int, int]] = []
    last_start, last_end = ranges[0]
    for start, end in ranges[1:]:
        if start <= last_end:
            if end > last_end:
                last_end = end
        else:
            merged.append((last_start, last_end))
            last_start, last_end = start, end
    merged.append((last_start, last_end))
    return tuple(merged)


def segments(text: str, marks: Marks) -> Segments:
    """`text` cut at merged `marks`, each piece flagged whether it is marked."""
    if not marks:
        return [(text, False)] if text else []
    out: Segments = []
    cursor = 0
    for start, end in marks:
        if start > cursor:
            out.append((text[cursor:start], False))
        out.append((text[start:end], True))
        cursor = end
    if cursor < len(text):
        out.append((text[cursor:], False))
    return out


def highlight(
    text: str,
    keywords: Iterable[str],
    synonyms: Mapping[str, Iterable[str]] | None = None,
) -> Segments:
    """Cut `text` into segments, flagging those a keyword matched, for <mark> in templates.

    Uses exactly the matching rules of MatchIndex, so the reader sees why an entry was picked.
    The segments concatenate back to `text` unchanged; marked segments never touch each other.
    """
    field, offsets = _analyse(text)
    table = _synonyms_for(synonyms)
    ranges = [r for k in keywords for r in _keyword_ranges(field, offsets, table.alternatives(k))]
    return segments(text, merge_marks(ranges))


class Highlighter:
    """`highlight` for a whole send run, with the same result.

    A run shows a few thousand papers to many readers, each with their own mix of keywords
    (at 100,000 readers about half of the (paper, matched keywords) pairs occur only once), so
    caching whole results helps little. Instead a text is analysed once while it is in use and
    each (text, keyword) pair's ranges are found once; a reader's mix only merges ranges.
    Both caches are bounded, so a long-running worker does not grow.
    """

    def __init__(
        self,
        synonyms: Mapping[str, Iterable[str]] | None = None,
        *,
        texts: int = 8_192,
        pairs: int = 200_000,
    ) -> None:
        self._table = _synonyms_for(synonyms)
        self._alternatives: dict[str, list[_Phrase]] = {}
        self._analysed: OrderedDict[str, tuple[_Field, _Offsets]] = OrderedDict()
        # text -> keyword -> ranges: one look-up per keyword of a reader's mix
        self._ranges: dict[str, dict[str, tuple[tuple[int, int], ...]]] = {}
        self._pairs = 0
        self._max_texts = texts
        self._max_pairs = pairs
        # text -> where an index holds it: (index, doc id, in title, characters shown)
        self._indexed: dict[str, tuple[MatchIndex, int, bool, int]] = {}

    def indexed(self, text: str, index: MatchIndex, doc_id: int, title: bool) -> bool:
        """Find `text`'s highlights in `index` (which analysed the doc already) instead of
        analysing it again: `text` is the doc's title, or its summary as `render.shorten`
        gives it (the collapsed summary, or the start of it). A send run's planner holds
        such an index; each of its texts then costs no analysis here, nor its memory.
        Returns False (nothing changed) if `text` is not what the index holds."""
        held = index.text(doc_id, title)
        if held is None:
            return False
        shown = len(text)
        if not title and text.endswith("…") and held != text:
            shown -= 1
        if held[:shown] != text[:shown] or (title and held != text):
            return False
        if len(self._indexed) >= self._max_texts:
            self._indexed.clear()
        self._indexed[text] = (index, doc_id, title, shown)
        return True

    def _find(self, text: str, keyword: str) -> tuple[tuple[int, int], ...]:
        source = self._indexed.get(text)
        if source is not None:
            index, doc_id, title, shown = source
            found = index.ranges(doc_id, title, keyword)
            # A match the shortened summary does not show whole is not marked (it is not
            # there to be seen: analysing the shortened text would not find it either).
            return tuple(r for r in found if r[1] <= shown) if not title else found
        analysed = self._analysed.get(text)
        if analysed is None:
            analysed = self._analysed[text] = _analyse(text)
            if len(self._analysed) > self._max_texts:
                self._analysed.popitem(last=False)
        else:
            self._analysed.move_to_end(text)
        alternatives = self._alternatives.get(keyword)
        if alternatives is None:
            if len(self._alternatives) >= self._max_pairs:
                self._alternatives.clear()
            alternatives = self._alternatives[keyword] = self._table.alternatives(keyword)
        return _keyword_ranges(*analysed, alternatives)

    def marks(self, text: str, keywords: Iterable[str]) -> Marks:
        """Where `keywords` occur in `text`, merged: a reader's mix costs a few look-ups."""
        if not text:
            return ()
        known = self._ranges.get(text)
        if known is None:
            if len(self._ranges) >= self._max_texts or self._pairs >= self._max_pairs:
                self._ranges.clear()
                self._pairs = 0
            known = self._ranges[text] = {}
        ranges: list[tuple[int, int]] = []
        for keyword in keywords:
            found = known.get(keyword)
            if found is None:
                found = known[keyword] = self._find(text, keyword)
                self._pairs += 1
            if found:
                ranges += found
        return merge_marks(ranges)

    def __call__(self, text: str, keywords: Iterable[str]) -> Segments:
        return segments(text, self.marks(text, keywords))


_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def validate_keyword(raw: str) -> str:
    """Normalise a keyword typed into a form or CLI, or say clearly why it cannot be used.

    Control characters (including line breaks) are refused rather than cleaned, because they
    usually mean a paste went wrong, and they could smuggle headers or markup into emails.
    """
    if not isinstance(raw, str):
        raise ValueError(f"keyword must be text, not {type(raw).__name__}")
    for ch in raw:
        if unicodedata.category(ch) == "Cc" or ch in _BIDI_CONTROLS:
            raise ValueError(
                f"keyword {raw.strip()[:40]!r} contains a control character or line break"
            )
    keyword = " ".join(raw.split())
    if not keyword:
        raise ValueError("keyword is empty")
    if len(keyword) > MAX_KEYWORD_LENGTH:
        raise ValueError(
            f"keyword is too long ({len(keyword)} characters; at most {MAX_KEYWORD_LENGTH})"
        )
    if "<" in keyword or ">" in keyword:
        raise ValueError(f"keyword {keyword!r} must not contain markup characters < or >")
    if _phrase(keyword) is None:
        raise ValueError(f"keyword {keyword!r} has no letters or digits to match")
    return keyword
