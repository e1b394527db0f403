"""The words the explorer uses, in plain words, and helpers that explain a word where it appears.

Each :class:`Term` has a one-line ``short`` definition (used as a widget's help text, where a
tooltip has room for one sentence) and a few plain sentences (``text``) for the Glossary page
and for the popovers a page puts next to a formula or a name. ``phrases`` lists how the app
writes the word in its visible texts (``"F(image) − F(baseline)"``, ``"Gauss-Legendre"``...), so
tests can check that every such phrase has an entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

PAGE = "pages/12_glossary.py"


@dataclass(frozen=True)
class Term:
    """One glossary entry.

    Attributes
    ----------
    key : str
        Stable identifier (also the anchor on the Glossary page).
    name : str
        The word as a heading.
    short : str
        One plain sentence, for help texts and tooltips.
    text : str
        A few plain sentences: what it is, and why it matters here.
    phrases : tuple of str
        How the app writes this word in its visible texts (case-insensitive matches).
    """

    key: str
    name: str
    short: str
    text: str
    phrases: tuple[str, ...] = ()


TERMS: tuple[Term, ...] = (
    Term(
        "model",
        "Model",
        "A program that has learned from examples to give each possible answer a score.",
        "A model takes a picture and gives every possible answer (here: every shape name) a "
        "score. The answer with the highest score is its guess. It learned how to score from "
        "thousands of example pictures.",
        ("model",),
    ),
    Term(
        "score",
        "Score",
        "The number the model gives one answer for one picture; higher means more confident.",
        "The number the model gives one possible answer for one picture. Formulas in the app "
        "write the score for a picture as F(image) or F(x): the same thing, F is the model and "
        "x or image is the picture it looks at.",
        ("F(image)", "F(x)", "score"),
    ),
    Term(
        "target",
        "Target class",
        "The answer whose score we want to explain, usually the model's own guess.",
        "The answer whose score is being explained. By default it is the model's own guess, "
        "but you can pick any answer to ask 'what in this picture speaks for or against it?'.",
        ("target class", "target", "top class", "predicted class"),
    ),
    Term(
        "layer",
        "Layer",
        "One stage of the network; each stage turns the previous stage's output into new numbers.",
        "The network works in stages, one after the other. Early layers respond to simple "
        "things such as edges and colours; later layers combine those into parts and whole "
        "shapes. The app explains what happens at the output of one layer at a time.",
        ("layer",),
    ),
    Term(
        "channel",
        "Channel",
        "One kind of pattern a layer looks for, measured at every place in the picture.",
        "A layer looks for several kinds of pattern at once. Each kind is a channel, and the "
        "channel gives a number for every place in the picture: a map of where that pattern "
        "is found.",
        ("channel",),
    ),
    Term(
        "neuron",
        "Neuron",
        "One number inside the network: one channel at one place in the picture.",
        "One number inside the network: one channel of a layer at one place in the picture. "
        "It is large when the pattern that channel looks for is present at that place.",
        ("neuron",),
    ),
    Term(
        "activation",
        "Activation",
        "The value a neuron takes for this picture: how strongly it responds.",
        "The value a neuron takes for the picture shown. Zero means it does not respond at "
        "all; a large value means its pattern is clearly there.",
        ("activation",),
    ),
    Term(
        "gradient",
        "Gradient",
        "How much a number (a score or a neuron) would change if one pixel changed a little.",
        "For every pixel: how much a number would go up or down if that pixel were made a "
        "little brighter. Red pixels would raise it, blue ones would lower it. A neuron's "
        "gradient therefore shows what it is looking at: an edge detector's gradient is red on "
        "one side of a line and blue on the other.",
        ("gradient",),
    ),
    Term(
        "receptive-field",
        "Receptive field",
        "The patch of the picture a neuron can see; pixels outside it cannot change it.",
        "The part of the picture that can affect one neuron. Neurons in early layers see a few "
        "pixels; neurons in later layers see a large part of the picture.",
        ("receptive field",),
    ),
    Term(
        "baseline",
        "Baseline",
        "A 'blank' reference picture to compare against, for example an all-black image.",
        "A reference picture that shows 'nothing', such as an all-black image or a blurred "
        "copy. Explanations answer: what made the score for this picture differ from the score "
        "for the baseline?",
        ("baseline",),
    ),
    Term(
        "score-difference",
        "Score difference",
        "The score for the picture minus the score for the baseline: the amount to be explained.",
        "The score for the picture minus the score for the baseline. The app writes it as "
        "F(image) − F(baseline) (or F(x) − F(baseline)): F is the model, so it reads 'score of "
        "the picture minus score of the blank picture'. Conductance shares out exactly this "
        "amount.",
        ("F(image) − F(baseline)", "F(x) − F(baseline)", "score difference"),
    ),
    Term(
        "path",
        "Path",
        "A series of in-between pictures that fade from the baseline to the real picture.",
        "A series of in-between pictures that fade step by step from the baseline into the "
        "real picture. The app watches how the model's numbers change along the way and adds "
        "those changes up.",
        ("path",),
    ),
    Term(
        "steps",
        "Steps (n_steps)",
        "How many in-between pictures are used on the path; more steps, more accurate, slower.",
        "How many in-between pictures the app uses along the path. More steps give a more "
        "accurate answer but take longer. The setting is called n_steps.",
        ("n_steps", "steps"),
    ),
    Term(
        "conductance",
        "Conductance",
        "How much of the score difference passes through each neuron or channel of a layer.",
        "How much of the score difference passes through each neuron or channel of the chosen "
        "layer on the way from baseline to picture. Red parts pushed the score up, blue parts "
        "pushed it down, and all parts together add up to the score difference.",
        ("conductance",),
    ),
    Term(
        "completeness",
        "Completeness",
        "The rule that all conductance together must add up to the score difference.",
        "The rule that the conductance of all parts of a layer must add up to the score "
        "difference, nothing more and nothing less. It is how the app checks its own work.",
        ("completeness",),
    ),
    Term(
        "delta",
        "Delta (convergence delta)",
        "How far the added-up conductance misses the score difference; small means trustworthy.",
        "The added-up conductance minus the score difference. With a perfect calculation it "
        "would be zero. Because the app uses a limited number of steps, it is a little off; "
        "the delta says by how much. A small delta (say under 5% of the score difference) "
        "means the maps can be trusted; a large one means: use more steps.",
        ("convergence delta", "delta"),
    ),
    Term(
        "integration-method",
        "Integration method (Gauss-Legendre, Riemann)",
        "The recipe for placing the steps on the path; Gauss-Legendre needs the fewest steps.",
        "The recipe for choosing where on the path the in-between pictures go and how much each "
        "one counts. 'Riemann' recipes space them evenly; 'Gauss-Legendre' places them "
        "cleverly, so it usually reaches a small delta with far fewer steps.",
        ("Gauss-Legendre", "Riemann", "integration method"),
    ),
    Term(
        "tolerance",
        "Tolerance",
        "The largest delta you accept, as a share of the score difference.",
        "The largest delta you are willing to accept, as a percentage of the score difference. "
        "Results within it are marked pass, the others warn.",
        ("tolerance",),
    ),
)
"""Every entry, in reading order (simple words first)."""

BY_KEY: dict[str, Term] = {term.key: term for term in TERMS}


def term(key: str) -> Term:
    """The entry named ``key`` (a :class:`KeyError` names the known keys)."""
    try:
        return BY_KEY[key]
    except KeyError:
        raise KeyError(f"No glossary entry {key!r}; known: {', '.join(BY_KEY)}") from None


def help_text(key: str, extra: str = "") -> str:
    """A widget's help text: the plain one-liner (plus ``extra``), pointing to the Glossary."""
    entry = term(key)
    lead = f"{extra} " if extra else ""
    return f"{lead}**{entry.name}:** {entry.short} More in the Glossary."


def explain(*keys: str, label: str | None = None) -> None:
    """A small popover that explains the given words in plain language, where they appear.

    Use it next to a formula or a name a newcomer would not know, e.g.
    ``explain("score-difference", "delta")`` beside a metric row.
    """
    entries = [term(k) for k in keys]
    title = label or "What does " + " / ".join(e.name.split(" (")[0] for e in entries) + " mean?"
    with st.popover(title, icon=":material/help:"):
        for entry in entries:
            st.markdown(f"**{entry.name}.** {entry.text}")
        st.page_link(PAGE, label="All words in the Glossary", icon=":material/menu_book:")


def search(query: str) -> list[Term]:
    """Entries whose name, phrases or text contain ``query`` (case-insensitive); all if empty."""
    needle = query.strip().lower()
    if not needle:
        return list(TERMS)
    return [
        t
        for t in TERMS
        if needle in t.name.lower()
        or needle in t.text.lower()
        or any(needle in p.lower() for p in t.phrases)
    ]
