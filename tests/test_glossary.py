"""The glossary: every piece of jargon the app shows has a plain entry, and entries stay plain."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from webapp import glossary as G

REPO = Path(__file__).resolve().parents[1]
APP_TEXT_FILES = sorted((REPO / "pages").glob("*.py")) + [
    REPO / "webapp" / "widgets.py",
    REPO / "webapp" / "figures.py",
    REPO / "webapp" / "tour.py",
]

JARGON = (
    "baseline",
    "path",
    "conductance",
    "gradient",
    "delta",
    "convergence delta",
    "Gauss-Legendre",
    "Riemann",
    "n_steps",
    "neuron",
    "channel",
    "activation",
    "completeness",
    "tolerance",
    "receptive field",
    "target class",
)
"""Words a newcomer would not know that the app's texts use."""

FORMULA = re.compile(r"F\((?:x|image|baseline)\)(?:\s*[−-]\s*F\(baseline\))?")
"""Formulas like ``F(x)``, ``F(image) − F(baseline)``."""

NOT_PLAIN = (
    "integral",
    "derivative",
    "partial",
    "jacobian",
    "tensor",
    "logit",
    "softmax",
    "quadrature",
    "axiom",
    "∫",
    "∂",
    "Σ",
    "α",
)
"""Words and signs a definition must not lean on."""


def _visible_strings(path: Path) -> list[str]:
    """String constants of a source file (f-string pieces included), docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def _app_text() -> str:
    return "\n".join(s for path in APP_TEXT_FILES for s in _visible_strings(path))


def _covered(phrase: str) -> bool:
    return bool(G.search(phrase)) and any(
        phrase.lower() in p.lower() or p.lower() in phrase.lower()
        for t in G.TERMS
        for p in t.phrases
    )


@pytest.mark.parametrize("word", ["baseline", "path", "conductance", "gradient", "delta"])
def test_the_required_words_have_entries(word):
    assert any(word in t.name.lower() or word in t.phrases for t in G.TERMS)


def test_every_jargon_word_the_app_shows_has_an_entry():
    text = _app_text().lower()
    shown = [w for w in JARGON if w.lower() in text]
    assert len(shown) >= 10  # the scan reads the app's texts
    missing = [w for w in shown if not _covered(w)]
    assert not missing, f"jargon without a glossary entry: {missing}"


def test_every_formula_the_app_shows_is_explained():
    formulas = set(FORMULA.findall(_app_text()))
    assert "F(image) − F(baseline)" in formulas  # the scan finds the formulas
    for formula in formulas:
        entries = [t for t in G.TERMS if formula in t.phrases]
        assert entries, f"{formula} appears in the app but no glossary entry explains it"
        assert formula in entries[0].text  # the entry spells the formula out, in words


def test_definitions_are_plain():
    for entry in G.TERMS:
        for text in (entry.short, entry.text):
            lowered = text.lower()
            assert not [w for w in NOT_PLAIN if w.lower() in lowered], entry.key
        # Short enough for a tooltip, one sentence.
        assert len(entry.short.split()) <= 20, entry.key
        assert entry.short.count(". ") == 0, entry.key
        # Sentences a listener can follow: none longer than 40 words.
        for sentence in re.split(r"(?<=[.!?])\s+", entry.text):
            assert len(sentence.split()) <= 40, (entry.key, sentence)
        # Only the entries that explain a formula may show one.
        if FORMULA.search(entry.text):
            assert any(FORMULA.fullmatch(p) for p in entry.phrases), entry.key


def test_keys_are_unique_and_lookup_names_the_known_keys():
    assert len(G.BY_KEY) == len(G.TERMS)
    assert G.term("delta").name.startswith("Delta")
    with pytest.raises(KeyError, match="known: model"):
        G.term("nonsense")


def test_help_text_and_search():
    text = G.help_text("baseline", "The reference input.")
    assert text.startswith("The reference input. **Baseline:**")
    assert G.term("baseline").short in text and "Glossary" in text
    assert [t.key for t in G.search("gauss")] == ["integration-method"]
    assert [t.key for t in G.search("  F(x)  ")] == ["score", "score-difference"]
    assert len(G.search("")) == len(G.TERMS)
    assert G.search("zebra") == []
