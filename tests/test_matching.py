"""Matching semantics, ranking, highlighting and keyword validation (newsletter.matching)."""

from __future__ import annotations

import itertools
import json
import pickle
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from newsletter import matching
from newsletter.matching import (
    DEFAULT_SYNONYMS,
    Doc,
    Highlighter,
    Hit,
    MatchIndex,
    Pick,
    Profile,
    highlight,
    match,
    segments,
    validate_keyword,
)
from newsletter.render import shorten

FIXTURE = Path(__file__).parent / "data" / "daily-papers.json"
PAPERS = json.loads(FIXTURE.read_text(encoding="utf-8"))


def _published(raw: str) -> datetime | None:
    try:
        return datetime.strptime(raw, "%b %d, %Y").replace(tzinfo=UTC)
    except ValueError:
        return None  # the fixture has some dates without a year


FIXTURE_DOCS = [
    Doc(1000 + i, p["title"], p["abstract"], _published(p["date"])) for i, p in enumerate(PAPERS)
]
TITLE = {d.id: d.title for d in FIXTURE_DOCS}
BY_TITLE = {d.title: d for d in FIXTURE_DOCS}
FIXTURE_INDEX = MatchIndex(FIXTURE_DOCS)


def titles(picks: list[Pick]) -> set[str]:
    return {TITLE[p.doc_id] for p in picks}


def find(*keywords: str, exclude: tuple[str, ...] = (), limit: int = 100) -> list[Pick]:
    return FIXTURE_INDEX.match(Profile(tuple(keywords), exclude, limit))


def doc(id: int, title: str, summary: str = "", published: datetime | None = None) -> Doc:
    return Doc(id, title, summary, published)


def ids(
    docs: list[Doc],
    *keywords: str,
    exclude: tuple[str, ...] = (),
    synonyms: Mapping[str, Iterable[str]] | None = None,
) -> list[int]:
    return [p.doc_id for p in match(docs, Profile(tuple(keywords), exclude), synonyms)]


# --- word forms --------------------------------------------------------------------------------

QUANT_DOCS = [
    doc(1, "We quantize the weights"),
    doc(2, "Quantized transformers"),
    doc(3, "Post-training quantization"),
    doc(4, "Quantizing activations is hard"),
]


@pytest.mark.parametrize("keyword", ["quantization", "quantized", "Quantize", "QUANTIZING"])
def test_word_forms_match_through_stemming(keyword: str) -> None:
    assert sorted(ids(QUANT_DOCS, keyword)) == [1, 2, 3, 4]


def test_singular_keyword_matches_plural_in_title() -> None:
    picks = find("diffusion model")
    title = "Solving 3D Inverse Problems using Pre-trained 2D Diffusion Models"
    assert title in titles(picks)
    pick = next(p for p in picks if TITLE[p.doc_id] == title)
    assert pick.hits == (Hit("diffusion model", True, True),)


def test_diffusion_models_matches_the_papers_that_say_so() -> None:
    assert titles(find("diffusion models")) == {
        "Solving 3D Inverse Problems using Pre-trained 2D Diffusion Models",
        "Decomposed Diffusion Sampler for Accelerating Large-Scale Inverse Problems",
        "Solving Inverse Problems via Diffusion-Based Priors: An Approximation-Free Ensemble "
        "Sampling Approach",
        "A Unified Sampling Framework for Solver Searching of Diffusion Probabilistic Models",
        "A Unified Module for Accelerating STABLE-DIFFUSION: LCM-LORA",
        "PFGM++: Unlocking the Potential of Physics-Inspired Generative Models",
        "Fast, Expressive SE(n) Equivariant Networks through Weight-Sharing in "
        "Position-Orientation Space",
    }
    # "heat diffusion" and "diffusion-based methods" are not the phrase "diffusion models"
    assert "A Heat Diffusion Perspective on Geodesic Preserving Dimensionality Reduction" not in (
        titles(find("diffusion models"))
    )


@pytest.mark.parametrize("keyword", ["Schrödinger bridge", "schrodinger bridges", "SCHRÖDINGER"])
def test_schrodinger_bridge_in_title_and_latex_escaped_abstract(keyword: str) -> None:
    picks = find(keyword)
    expected = {
        "Light Schrödinger Bridge",
        "Multi-marginal Schrödinger Bridges with Iterative Reference Refinement",
    }
    assert expected <= titles(picks)
    for pick in picks:
        if TITLE[pick.doc_id] in expected:
            # the abstracts spell it Schr\"odinger: LaTeX accents must not split the word
            assert pick.hits[0].in_title and pick.hits[0].in_summary


def test_schrodinger_bridge_matches_nothing_else() -> None:
    assert len(find("Schrödinger bridge")) == 2


def test_quantum_and_quantization_do_not_meet() -> None:
    docs = [doc(1, "Quantum circuits at scale"), doc(2, "Quantization of weights")]
    assert ids(docs, "quantum") == [1]
    assert ids(docs, "quantization") == [2]
    assert ids(docs, "quantized") == [2]
    # fixture: five papers mention quantum; none mentions quantization ("quantification" either)
    assert len(find("quantum")) == 5
    assert find("quantization") == []
    assert find("quantize") == []


# --- whole words only --------------------------------------------------------------------------


def test_short_keywords_do_not_match_inside_words() -> None:
    docs = [
        doc(1, "Fragment averaging for storage"),
        doc(2, "Organ segmentation and organization"),
        doc(3, "RAG pipelines"),
        doc(4, "Conditional GANs"),
    ]
    assert ids(docs, "rag") == [3]
    assert ids(docs, "gan") == [4]


def test_short_keywords_on_fixture_match_whole_words_only() -> None:
    text = " ".join(f"{d.title} {d.summary}" for d in FIXTURE_DOCS).lower()
    # as substrings these are everywhere: "average", "storage"; "GPU", "GPR"; "both", "another"
    assert "rag" in text and "gp" in text and "ot" in text
    assert find("rag") == []
    assert titles(find("GP")) == {  # only through the synonym "Gaussian process"
        "Efficient Implementation of Gaussian Process Regression Accelerated Saddle Point "
        "Searches with Application to Molecular Reactions"
    }
    assert titles(find("OT")) == {"Light Schrödinger Bridge"}  # "discrete optimal transport"


# --- hyphen and spacing variants ---------------------------------------------------------------

VARIANT_FAMILIES = [
    ["bi-level", "bilevel", "bi level"],
    ["zeroth-order", "zerothorder", "zeroth order"],
    ["self-supervised", "selfsupervised", "self supervised"],
]


@pytest.mark.parametrize(
    ("keyword", "written"),
    [pair for family in VARIANT_FAMILIES for pair in itertools.product(family, family)],
)
def test_hyphen_and_space_variants_match_both_ways(keyword: str, written: str) -> None:
    docs = [doc(1, "A paper", f"We study {written} methods for learning."), doc(2, "Other")]
    assert ids(docs, keyword) == [1]


def test_hyphen_variants_in_longer_phrases() -> None:
    docs = [doc(1, "Zeroth order optimisation"), doc(2, "Self-supervised Learning at scale")]
    assert ids(docs, "zeroth-order optimisation") == [1]
    assert ids(docs, "selfsupervised learning") == [2]
    assert ids(docs, "self supervised learning") == [2]


def test_finetuning_spellings_on_fixture() -> None:
    byte = (
        "Just One Byte (per gradient): A Note on Low-Bandwidth Decentralized Language Model "
        "Finetuning Using Shared Randomness"
    )
    for keyword in ("finetuning", "fine-tuning", "fine tuning"):
        picks = find(keyword)
        assert titles(picks) == {byte, "Merging Models with Fisher-Weighted Averaging"}
        assert picks[0].doc_id == BY_TITLE[byte].id  # title hit ranks first
    assert titles(find("self supervised learning")) == {
        "Barlow Twins: Self-Supervised Learning via Redundancy Reduction"
    }


def test_function_words_are_not_glued_across_spaces() -> None:
    docs = [doc(1, "It takes a long time"), doc(2, "Solved on line search"), doc(3, "Online RL")]
    assert ids(docs, "along") == []
    assert ids(docs, "online") == [3]


# --- phrases -----------------------------------------------------------------------------------


def test_phrase_words_must_be_adjacent_and_in_order() -> None:
    docs = [
        doc(1, "Language and vision models"),
        doc(2, "Models of language"),
        doc(3, "Small language models"),
    ]
    assert ids(docs, "language models") == [3]


def test_phrase_does_not_cross_a_sentence_or_a_field() -> None:
    docs = [
        doc(1, "Heat diffusion", "Models of this kind are common."),
        doc(2, "Notes", "We use diffusion. Models are trained later."),
        doc(3, "Notes", "We use diffusion models."),
    ]
    assert ids(docs, "diffusion models") == [3]


def test_latex_markup_words_are_ignored() -> None:
    docs = [doc(1, "Glassy nets", r"the phenomenon of {\em replica symmetry breaking} (RSB)")]
    assert ids(docs, "of replica symmetry") == [1]
    assert ids(docs, "em") == []
    assert marked(highlight(docs[0].summary, ["replica symmetry"])) == ["replica symmetry"]


# --- acronyms and synonyms ---------------------------------------------------------------------

LLM_DOCS = [
    doc(1, "Scaling large language models"),
    doc(2, "LLMs as judges"),
    doc(3, "An LLM agent"),
    doc(4, "Small language models"),
    doc(5, "Large-language-model evaluation"),
]


@pytest.mark.parametrize(
    "keyword", ["LLM", "llm", "LLMs", "large language models", "Large Language Model"]
)
def test_acronym_and_expansion_match_each_other(keyword: str) -> None:
    assert sorted(ids(LLM_DOCS, keyword)) == [1, 2, 3, 5]


def test_acronym_plurals() -> None:
    docs = [doc(1, "Neural PDE solvers"), doc(2, "Learning PDEs"), doc(3, "SDEs meet GNNs")]
    assert ids(docs, "PDE") == ids(docs, "PDEs") == [1, 2]
    assert ids(docs, "SDE") == [3]
    assert ids(docs, "graph neural network") == [3]


def test_acronyms_on_fixture() -> None:
    gnn = titles(find("GNN"))
    assert gnn == titles(find("graph neural networks"))
    assert "Frame Averaging for Invariant and Equivariant Network Design" in gnn  # "GNNs"
    assert "Space and Time Continuous Physics Simulation From Partial Observations" in gnn
    # "PDE" finds a paper that only ever writes "partial differential equation"
    gradient = BY_TITLE["Gradient is All You Need?"]
    assert "PDE" not in gradient.summary
    assert gradient.title in titles(find("PDE"))
    assert "Barlow Twins: Self-Supervised Learning via Redundancy Reduction" in titles(find("SSL"))


def test_default_synonym_table_is_sensible() -> None:
    assert 20 <= len(DEFAULT_SYNONYMS) <= 40
    for key, expansions in DEFAULT_SYNONYMS.items():
        assert key == key.lower() and expansions
        assert all(validate_keyword(e) == e for e in expansions)
    assert DEFAULT_SYNONYMS["llm"] == ("large language model",)


def test_operator_synonyms_extend_the_table() -> None:
    docs = [doc(1, "A KAN for PDEs"), doc(2, "Kolmogorov-Arnold networks"), doc(3, "An LLM")]
    table = {"KAN": ["Kolmogorov-Arnold network"]}
    assert ids(docs, "KAN") == [1]
    assert sorted(ids(docs, "KAN", synonyms=table)) == [1, 2]
    assert sorted(ids(docs, "kolmogorov arnold networks", synonyms=table)) == [1, 2]
    assert ids(docs, "large language model", synonyms=table) == [3]  # defaults still apply


def test_operator_synonyms_may_be_phrases() -> None:
    docs = [doc(1, "Attention networks"), doc(2, "A transformer model"), doc(3, "Transformers")]
    table = {"transformer model": ["attention network"]}
    assert sorted(ids(docs, "transformer models", synonyms=table)) == [1, 2]
    assert sorted(ids(docs, "attention networks", synonyms=table)) == [1, 2]


def test_operator_synonyms_override_a_default() -> None:
    docs = [doc(1, "Deep RL"), doc(2, "Reinforcement learning for robots")]
    assert sorted(ids(docs, "RL")) == [1, 2]
    assert ids(docs, "RL", synonyms={"rl": ()}) == [1]
    assert ids(docs, "RL", synonyms={"RL": "reinforcement learning"}) == [1, 2]


# --- exclusion ---------------------------------------------------------------------------------

QUANTUM_TITLES = {
    "Adaptive Graph Shrinking for Quantum Optimization of Constrained Combinatorial Problems",
    "Cutting Slack: Quantum Optimization with Slack-Free Methods for Combinatorial Benchmarks",
}


def test_exclude_vetoes_quantum_papers_on_fixture() -> None:
    everything = titles(find("optimization"))
    assert everything >= QUANTUM_TITLES
    vetoed = titles(find("optimization", exclude=("quantum",)))
    assert vetoed and not (vetoed & QUANTUM_TITLES)
    quantum = titles(find("quantum"))
    assert vetoed == everything - quantum


def test_exclude_uses_the_same_matching_rules() -> None:
    docs = [
        doc(1, "Agents", "built on a large language model"),
        doc(2, "Agents", "with weight quantization"),
        doc(3, "Agents", "plain"),
    ]
    assert ids(docs, "agents", exclude=("LLMs",)) == [2, 3]
    assert ids(docs, "agents", exclude=("quantum",)) == [1, 2, 3]
    assert ids(docs, "agents", exclude=("quantized",)) == [1, 3]


def test_exclude_in_title_vetoes_too() -> None:
    docs = [doc(1, "Quantum RL", "policy gradient"), doc(2, "RL", "policy gradient")]
    assert ids(docs, "policy gradient", exclude=("quantum",)) == [2]


# --- ranking -----------------------------------------------------------------------------------

DAY = datetime(2025, 3, 1, tzinfo=UTC)


def test_title_hits_outrank_summary_hits() -> None:
    docs = [
        doc(1, "Notes", "about transformers", DAY + timedelta(hours=1)),  # newer, summary only
        doc(2, "Transformers", "notes", DAY),
    ]
    picks = match(docs, Profile(("transformer",)))
    assert [p.doc_id for p in picks] == [2, 1]
    assert picks[0].score > picks[1].score


def test_more_distinct_keywords_rank_higher() -> None:
    docs = [
        doc(1, "Notes", "graph networks", DAY + timedelta(hours=1)),
        doc(2, "Notes", "graph networks for molecules", DAY),
        doc(3, "Notes", "molecules", DAY + timedelta(hours=2)),
    ]
    picks = match(docs, Profile(("graph networks", "molecules")))
    assert [p.doc_id for p in picks] == [2, 3, 1]


def test_ties_go_to_newer_then_lower_id_and_undated_last() -> None:
    docs = [
        doc(5, "Graphs", "", None),
        doc(4, "Graphs", "", DAY),
        doc(3, "Graphs", "", DAY + timedelta(days=1)),
        doc(2, "Graphs", "", DAY),
        doc(1, "Graphs", "", None),
    ]
    assert ids(docs, "graphs") == [3, 2, 4, 1, 5]


def test_naive_and_aware_datetimes_can_be_mixed() -> None:
    plus2 = timezone(timedelta(hours=2))
    docs = [
        doc(1, "Graphs", "", datetime(2025, 3, 1, 12, 0)),  # naive: taken as UTC
        doc(2, "Graphs", "", datetime(2025, 3, 1, 13, 0, tzinfo=plus2)),  # 11:00 UTC
    ]
    assert ids(docs, "graphs") == [1, 2]


def test_results_are_capped_and_keep_rank_order() -> None:
    full = find("neural networks", limit=100)
    assert len(full) > 5
    top = find("neural networks", limit=5)
    assert top == full[:5]
    assert find("neural networks", limit=0) == []
    scores = [p.score for p in full]
    assert scores == sorted(scores, reverse=True)


def test_hits_say_which_keywords_matched_where_strongest_first() -> None:
    docs = [doc(7, "Graph transformers", "We train transformers on molecules.")]
    picks = match(docs, Profile(("molecules", "graph", "transformer", "absent")))
    assert picks == [
        Pick(
            7,
            6.0,
            (
                Hit("transformer", True, True),
                Hit("graph", True, False),
                Hit("molecules", False, True),
            ),
        )
    ]


def test_synonymous_keywords_count_once() -> None:
    docs = [doc(1, "Notes", "An LLM"), doc(2, "Notes", "Two tools and a large language model")]
    picks = match(docs, Profile(("LLM", "LLMs", "large language model", "tools")))
    assert [p.doc_id for p in picks] == [2, 1]
    assert picks[1].hits == (Hit("LLM", False, True),)
    assert picks[1].score == 1.0


def test_nothing_matched_means_empty_list() -> None:
    assert find("homotopy type theory") == []
    assert find("") == []
    assert find("---") == []
    assert match([], Profile(("anything",))) == []


def test_exclude_ids_are_never_returned() -> None:
    picks = find("equivariant")
    assert len(picks) >= 4
    sent = {picks[0].doc_id, picks[2].doc_id}
    again = FIXTURE_INDEX.match(Profile(("equivariant",), max_items=100), exclude_ids=sent)
    assert [p.doc_id for p in again] == [p.doc_id for p in picks if p.doc_id not in sent]
    capped = FIXTURE_INDEX.match(Profile(("equivariant",), max_items=2), exclude_ids=sent)
    assert [p.doc_id for p in capped] == [picks[1].doc_id, picks[3].doc_id]


# --- the index ---------------------------------------------------------------------------------


def test_index_length_and_duplicate_ids() -> None:
    assert len(FIXTURE_INDEX) == len(PAPERS) == 44
    index = MatchIndex([doc(1, "first graph"), doc(1, "second tree"), doc(2, "tree")])
    assert len(index) == 2
    assert [p.doc_id for p in index.match(Profile(("tree",)))] == [2]


def test_each_keyword_is_resolved_once_per_index(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real = matching._Field.phrase_bits

    def counting(self: matching._Field, phrase: matching._Phrase) -> int:
        calls.append(phrase)
        return real(self, phrase)

    monkeypatch.setattr(matching._Field, "phrase_bits", counting)
    index = MatchIndex(FIXTURE_DOCS)
    index.match(Profile(("diffusion models", "quantum")))
    first = len(calls)
    assert first > 0
    for _ in range(50):
        index.match(Profile(("quantum", "diffusion models"), exclude=("quantum",)))
        index.match(Profile(("Diffusion  Models",)))  # same keyword, other spelling
    assert len(calls) == first


def test_index_reads_the_documents_once() -> None:
    # Callers may pass a generator (e.g. a database cursor); everything must be indexed up front.
    consumed = iter(FIXTURE_DOCS)
    index = MatchIndex(consumed)
    assert next(consumed, None) is None
    assert titles(index.match(Profile(("Schrödinger bridge",)))) == titles(
        find("Schrödinger bridge")
    )


# --- highlight ---------------------------------------------------------------------------------


def marked(parts: list[tuple[str, bool]]) -> list[str]:
    return [segment for segment, flag in parts if flag]


def test_highlight_marks_phrase_forms_and_round_trips() -> None:
    text = "Solving 3D Inverse Problems using Pre-trained 2D Diffusion Models"
    parts = highlight(text, ["diffusion model", "inverse problem"])
    assert "".join(s for s, _ in parts) == text
    assert marked(parts) == ["Inverse Problems", "Diffusion Models"]


def test_highlight_latex_accents_and_acronyms() -> None:
    summary = BY_TITLE["Light Schrödinger Bridge"].summary
    parts = highlight(summary, ["Schrödinger bridge"])
    assert "".join(s for s, _ in parts) == summary
    assert marked(parts)[0] == 'Schr\\"odinger Bridges'
    assert marked(highlight("Use LLMs, or a large language model.", ["LLM"])) == [
        "LLMs",
        "large language model",
    ]


def test_highlight_variants_and_whole_words() -> None:
    assert marked(highlight("A bi-level and a bilevel idea", ["bi level"])) == [
        "bi-level",
        "bilevel",
    ]
    assert marked(highlight("fragment average RAG", ["rag"])) == ["RAG"]
    assert marked(
        highlight("A KAN", ["Kolmogorov-Arnold network"], {"kan": ["kolmogorov-arnold network"]})
    ) == ["KAN"]


def test_highlight_merges_overlaps_and_handles_empty_input() -> None:
    assert highlight("graph neural networks", ["graph neural", "neural networks"]) == [
        ("graph neural networks", True)
    ]
    assert highlight("", ["x"]) == []
    assert highlight("nothing here", []) == [("nothing here", False)]
    assert highlight("nothing here", ["absent"]) == [("nothing here", False)]


def test_highlighter_agrees_with_highlight_through_evictions() -> None:
    """The send path's caching Highlighter must mark exactly what `highlight` marks, also
    after its caches overflow (tiny limits force evictions on almost every call)."""
    synonyms = {"kan": ["kolmogorov-arnold network"]}
    keywords = ["diffusion model", "LLM", "graph neural network", "kan", "bi level", "reasoning"]
    tiny = matching.Highlighter(synonyms, texts=2, pairs=3)
    roomy = matching.Highlighter(synonyms)
    marked_somewhere = 0
    for d in FIXTURE_DOCS[:80]:
        for size in (1, 2, 4):
            for chosen in itertools.combinations(keywords, size):
                for text in (d.title, d.summary):
                    expected = highlight(text, chosen, synonyms)
                    assert tiny(text, chosen) == expected
                    assert roomy(text, chosen) == expected
                    marked_somewhere += any(flag for _, flag in expected)
    assert marked_somewhere > 100  # the comparison covered real highlights, not only misses
    assert roomy("", ["x"]) == []


def test_an_index_sent_to_another_process_matches_and_marks_the_same() -> None:
    """`send` builds the index once and pickles it to its helper processes: what they match
    and highlight with the copy must be exactly what the original gives."""
    synonyms = {"kan": ["kolmogorov-arnold network"]}
    original = MatchIndex(FIXTURE_DOCS, synonyms, highlights=True)
    copy = pickle.loads(pickle.dumps(original, protocol=pickle.HIGHEST_PROTOCOL))
    keywords = ["diffusion model", "LLM", "graph neural network", "kan", "reasoning", "agent"]
    marked = 0
    for size in (1, 2, 3):
        for chosen in itertools.combinations(keywords, size):
            profile = Profile(chosen, ("quantum",), 10)
            picks = original.match(profile)
            assert copy.match(profile) == picks
            for pick in picks:
                for in_title in (True, False):
                    for keyword in chosen:
                        ranges = original.ranges(pick.doc_id, in_title, keyword)
                        assert copy.ranges(pick.doc_id, in_title, keyword) == ranges
                        marked += bool(ranges)
    assert marked > 100, "the comparison covered real highlights"


@pytest.mark.parametrize("highlights", [True, False], ids=["kept-while-indexing", "found-later"])
def test_index_ranges_are_where_highlight_finds_the_keyword(highlights: bool) -> None:
    """Whether the index kept each word's place while indexing (as `send`'s planner asks) or
    finds the words again when first asked, its ranges are `highlight`'s."""
    keywords = ["diffusion model", "LLM", "reinforcement learning", "reasoning", "model"]
    index = MatchIndex(FIXTURE_DOCS, highlights=highlights)
    found = 0
    for d in FIXTURE_DOCS:
        for in_title, text in ((True, d.title), (False, " ".join(d.summary.split()))):
            for keyword in keywords:
                ranges = list(index.ranges(d.id, in_title, keyword))
                expected = highlight(text, [keyword])
                assert segments(text, matching.merge_marks(ranges)) == expected
                found += len(ranges)
    assert found > 50


# --- validate_keyword --------------------------------------------------------------------------


def test_validate_keyword_normalises_whitespace() -> None:
    assert validate_keyword("  diffusion \u00a0  models ") == "diffusion models"
    assert validate_keyword("Schrödinger bridge") == "Schrödinger bridge"
    assert validate_keyword("E(3)") == "E(3)"
    assert validate_keyword("x" * 80) == "x" * 80


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("x" * 81, "too long"),
        ("diffusion\nmodels", "control"),
        ("diffusion\r\nmodels", "control"),
        ("tab\there", "control"),
        ("nul\x00", "control"),
        ("rtl\u202eoverride", "control"),
        ("<script>", "markup"),
        ("a > b", "markup"),
        ("---", "letters or digits"),
    ],
)
def test_validate_keyword_rejects_with_a_clear_message(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_keyword(raw)


# --- properties --------------------------------------------------------------------------------

# Words whose stems are themselves and which never glue into one another, so a plain
# list-of-words model can serve as the reference for matching and ranking.
VOCAB = ["alpha", "beta", "gamma", "delta", "omega"]
words = st.lists(st.sampled_from(VOCAB), max_size=8)
phrases = st.lists(st.sampled_from(VOCAB), min_size=1, max_size=3).map(" ".join)


def _contains(text_words: list[str], phrase: str) -> bool:
    needle = phrase.split()
    return any(
        text_words[i : i + len(needle)] == needle for i in range(len(text_words) - len(needle) + 1)
    )


@st.composite
def corpora(draw: st.DrawFn) -> tuple[list[Doc], Profile, set[int]]:
    n = draw(st.integers(0, 12))
    docs = [
        Doc(
            draw(st.integers(0, 10**6)),
            " ".join(draw(words)),
            " ".join(draw(words)),
            draw(st.none() | st.integers(0, 5).map(lambda d: DAY + timedelta(days=d))),
        )
        for _ in range(n)
    ]
    docs = list({d.id: d for d in reversed(docs)}.values())  # unique ids, first one wins
    profile = Profile(
        tuple(dict.fromkeys(draw(st.lists(phrases, min_size=1, max_size=4)))),
        tuple(draw(st.lists(phrases, max_size=2))),
        draw(st.integers(0, 6)),
    )
    sent = set(draw(st.lists(st.sampled_from([d.id for d in docs]), max_size=3))) if docs else set()
    return docs, profile, sent


def _reference(docs: list[Doc], profile: Profile, sent: set[int]) -> list[Pick]:
    scored = []
    for d in docs:
        title, summary = d.title.split(), d.summary.split()
        if d.id in sent or any(
            _contains(title, x) or _contains(summary, x) for x in profile.exclude
        ):
            continue
        hits = [
            Hit(k, _contains(title, k), _contains(summary, k))
            for k in dict.fromkeys(" ".join(k.split()) for k in profile.keywords)
        ]
        hits = [h for h in hits if h.in_title or h.in_summary]
        if not hits:
            continue
        score = sum(2 * h.in_title + h.in_summary for h in hits)
        hits.sort(key=lambda h: (not h.in_title, not h.in_summary))
        when = d.published.timestamp() if d.published else float("-inf")
        scored.append(((-score, -when, d.id), Pick(d.id, float(score), tuple(hits))))
    scored.sort(key=lambda pair: pair[0])
    return [pick for _, pick in scored[: max(profile.max_items, 0)]]


@settings(max_examples=300, deadline=None)
@given(corpora())
def test_matches_a_plain_reference_model(case: tuple[list[Doc], Profile, set[int]]) -> None:
    docs, profile, sent = case
    got = MatchIndex(docs).match(profile, exclude_ids=sent)
    assert got == _reference(docs, profile, sent)
    assert len(got) <= max(profile.max_items, 0)
    assert not {p.doc_id for p in got} & sent


@settings(max_examples=300, deadline=None)
@given(st.text(), st.lists(st.text(max_size=20), max_size=4))
def test_highlight_round_trips_any_text(text: str, keywords: list[str]) -> None:
    parts = highlight(text, keywords)
    assert "".join(segment for segment, _ in parts) == text
    assert all(segment for segment, _ in parts)
    assert all(not (a[1] and b[1]) for a, b in itertools.pairwise(parts))


@settings(max_examples=200, deadline=None)
@given(words, st.lists(phrases, max_size=3))
def test_highlight_marks_exactly_the_keyword_occurrences(
    text_words: list[str], kws: list[str]
) -> None:
    text = " ".join(text_words)
    parts = highlight(text, kws)
    flags: list[bool] = []
    for segment, flag in parts:
        flags += [flag] * len(segment.split())
    expected = [False] * len(text_words)
    for kw in kws:
        n = len(kw.split())
        for i in range(len(text_words) - n + 1):
            if text_words[i : i + n] == kw.split():
                expected[i : i + n] = [True] * n
    assert flags == expected


_WORDS = st.sampled_from(
    [
        "diffusion",
        "models",
        "model",
        "bi",
        "level",
        "bilevel",
        "LLMs",
        "large",
        "language",
        'Schr\\"odinger',
        "bridge",
        "E(3)",
        "the",
        "of",
        "graph",
        "neural",
        "networks",
        "é",
        "x",
    ]
)
_GAPS = st.sampled_from([" ", " ", " ", "\n", "  ", " \t", "-", " - ", ", ", ". ", "; ", "\xa0"])


@st.composite
def _texts(draw: st.DrawFn, max_words: int) -> str:
    words = draw(st.lists(_WORDS, min_size=1, max_size=max_words))
    gaps = draw(st.lists(_GAPS, min_size=len(words), max_size=len(words)))
    return "".join(w + g for w, g in zip(words, gaps, strict=True)).strip()


@given(
    title=_texts(12),
    summary=_texts(150),
    keywords=st.lists(
        st.sampled_from(
            [
                "diffusion models",
                "bilevel",
                "bi-level",
                "LLM",
                "Schrödinger bridge",
                "E(3)",
                "graph neural network",
                "GNN",
                "the",
                "x",
                "é",
            ]
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_highlights_from_the_index_are_those_of_the_text_shown(
    title: str, summary: str, keywords: list[str]
) -> None:
    """A send run highlights from its planner's index (`Highlighter.indexed`) instead of
    analysing each email's title and shortened summary again: the marks must be exactly
    those `highlight` finds in the text the email shows, line breaks, non-breaking spaces
    and the cut of a long summary (a match cut in two is not marked) included."""
    index = MatchIndex([Doc(7, title, summary, None)])
    shown = shorten(summary)[0]
    highlighter = Highlighter()
    assert highlighter.indexed(title, index, 7, title=True)
    assert highlighter.indexed(shown, index, 7, title=False)
    assert segments(title, highlighter.marks(title, keywords)) == highlight(title, keywords)
    assert segments(shown, highlighter.marks(shown, keywords)) == highlight(shown, keywords)
    assert not Highlighter().indexed(shown + "!", index, 7, title=False), "not what it holds"


# Words that glue into one another ("self-supervised" ~ "selfsupervised" ~ "self supervised"),
# with the separators that decide whether they may: the ways a two-word phrase can occur.
GLUING = ["self", "supervised", "selfsupervised", "pre", "training", "pretraining", "the", "of"]
glued_texts = st.lists(
    st.tuples(st.sampled_from(GLUING), st.sampled_from([" ", "-", " - ", ", ", ". "])),
    max_size=10,
).map(lambda pairs: "".join(word + gap for word, gap in pairs))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(glued_texts, min_size=1, max_size=8),
    st.sampled_from([("self", "supervised"), ("pre", "training"), ("supervised", "pre")])
    | st.tuples(st.sampled_from(GLUING), st.sampled_from(GLUING)),
)
@example(["a selfsupervised model", "self supervised", "self, supervised"], ("self", "supervised"))
@example(["selfsupervised of", "self-supervised pre training"], ("selfsupervised", "pre"))
def test_two_word_phrases_are_found_as_by_the_general_rule(
    texts: list[str], words: tuple[str, str]
) -> None:
    """`_Field.phrase_bits` finds two-word phrases (most of those readers type) with `_ends`
    unrolled; it must find exactly the entries the general rule finds, glued forms included."""
    index = MatchIndex(Doc(i, text, text, None) for i, text in enumerate(texts))
    phrase = matching._phrase(" ".join(words))
    assert phrase is not None and len(phrase[0]) == 2
    for field in (index._title, index._summary):
        plan = field._plan(phrase)
        expected = sum(1 << slot for slot in range(len(texts)) if matching._ends(plan, slot, -1))
        assert field.phrase_bits(phrase) == expected


# Pieces of arXiv-like text: words, words that glue, function words, LaTeX markup and accents,
# apostrophes, and every kind of gap between words (spaces, hyphens, clause breaks, others).
TEXT_PIECES = st.sampled_from(
    [
        *GLUING,
        'Schr\\"odinger',
        'Schr{\\"o}dinger',
        "\\em",
        "\\textbf{x}",
        "model's",
        "LLMs",
        "naïve",
        "\u0301",
        "E(3)",
        "3.5",
        "e.g.",
        " ",
        "  ",
        "\n",
        "-",
        " - ",
        "‐",
        ", ",
        ". ",
        "; ",
        '? "',
        "/",
        " (",
        ") ",
        "_",
        "\\",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(TEXT_PIECES, max_size=30).map("".join) | st.text())
@example("the self-supervised, pre training. Of \\em bi level")
def test_a_text_is_indexed_as_its_tokens_say(text: str) -> None:
    """`_postings_of_text` indexes a day's texts with whole-text steps; the postings (words and
    glued pairs at their positions) and the offsets must be exactly those of `_tokens`."""
    tokens = list(matching._tokens(text))
    postings, offsets = matching._postings_of_text(text, True)
    assert postings == matching._postings(tokens)
    assert offsets is not None
    expected = matching._Offsets.of(tokens)
    assert (offsets.starts, offsets.ends) == (expected.starts, expected.ends)
    assert matching._postings_of_text(text, False) == (postings, None)
