"""User strings reach the page as literal text: escaping for markdown and Plotly, and the app.

File names, class names, module names and the errors quoting them are chosen by whoever uploads
the files; rendered as markdown they could show outside links or make the browser fetch outside
images. The unit tests check :mod:`webapp.text`; the AppTests load a labels file of hostile names
and read every markdown source the pages produce.
"""

from __future__ import annotations

import html as stdlib_html
import re
import string
from pathlib import Path

import pytest
from apphelpers import (
    PAGE_CONDUCTANCE,
    PAGE_CONVERGENCE,
    error_text,
    open_page,
    upload_model,
    widget,
)
from google.protobuf.json_format import MessageToDict
from hypothesis import given
from hypothesis import strategies as st

from webapp.text import WORD_JOINER, html, md

REPO = Path(__file__).resolve().parents[2]
DEMO_WEIGHTS = REPO / "assets" / "demo" / "demo_cnn.safetensors"

HOSTILE = [
    "![x](http://127.0.0.1:9/t.png) [Update](https://example.invalid)",
    "[click](https://example.invalid/c 'title') <https://example.invalid/auto>",
    ":red[red] :material/home: :smile: :blue-badge[b]",
    "$x^2$ and $$\\int_0^1 y$$",
    '<b>bold</b> <a href="https://example.invalid">a</a> <img src="http://127.0.0.1:9/i.png">',
    "https://example.invalid/bare www.example.invalid user@example.invalid",
    "back\\slash \\\\ \\* **not bold** _not it_ ~~not struck~~ `not code`",
    "# not a heading\n- not a list\n> not a quote\n1. not numbered",
    "[ref]: https://example.invalid",
    "&amp; &lt; &#60; &copy; &quot;",
]


def markdown_unescape(text: str) -> str:
    """What CommonMark shows for text made of backslash escapes and plain characters."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", text).replace(WORD_JOINER, "")


def unescaped_punctuation(text: str) -> list[str]:
    """ASCII punctuation characters of ``text`` that no backslash escapes."""
    found, escaped = [], False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in string.punctuation:
            found.append(char)
    return found


# --- md ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", HOSTILE)
def test_md_round_trips_as_visible_text(text):
    out = md(text)
    assert markdown_unescape(out) == " ".join(text.split("\n"))
    assert not unescaped_punctuation(out)
    assert "\n" not in out and "](" not in out and "![" not in out


def test_md_escapes_each_construct():
    assert md("[a](b)") == "\\[a\\]\\(b\\)"
    assert md("![i](u)") == "\\!\\[i\\]\\(u\\)"
    assert md("$x$") == "\\$x\\$"
    assert md("a\\b") == "a\\\\b"
    assert md("<b>") == "\\<b\\>"
    assert md("line\nnext\r\ttab\x00") == "line next  tab "
    # Streamlit links bare addresses after escapes are removed: a word joiner breaks them up.
    assert md("https://x") == f"https{WORD_JOINER}\\:\\/\\/x"
    assert md("a@b") == f"a{WORD_JOINER}\\@b"
    assert md("WWW.x.y") == f"WWW{WORD_JOINER}\\.x\\.y"
    assert md(":material/home:") == f"{WORD_JOINER}\\:material\\/home{WORD_JOINER}\\:"
    assert md("plain name 123 é ü") == "plain name 123 é ü"
    assert md(42) == "42"


@given(st.text(alphabet=string.printable + "äé€\u2028\x85\x7f", max_size=80))
def test_md_round_trips_any_text(text):
    out = md(text)
    assert not unescaped_punctuation(out)
    assert markdown_unescape(out) == re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", " ", text)


# --- html --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", HOSTILE)
def test_html_round_trips_as_visible_text(text):
    out = html(text)
    assert not set("<>\"'\n") & set(out)
    assert "&quot;" not in out  # Plotly does not decode it
    assert stdlib_html.unescape(out) == " ".join(text.split("\n"))


@given(st.text(alphabet=string.printable + "äé€", max_size=80))
def test_html_round_trips_any_text(text):
    out = html(text)
    assert not set("<>\"'") & set(out)
    assert stdlib_html.unescape(out) == re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", text)


# --- the app ----------------------------------------------------------------------------------
# Element types whose text Streamlit shows as plain text (options, table cells, figure specs).
PLAIN_ELEMENTS = {
    "selectbox",
    "multiselect",
    "arrow_data_frame",
    "plotly_chart",
    "file_uploader",
    "imgs",
    "image",
    "number_input",
    "text_input",
    "slider",
    "select_slider",
}


def hostile_label(i: int) -> str:
    """A class name that is an outside image, an outside link, raw HTML and a bare address."""
    return (
        f"![i{i}](http://127.0.0.1:9/{i}.png) [Update{i}](https://example.invalid/{i}) "
        f'<img src="http://127.0.0.1:9/h{i}.png"> https://example.invalid/b{i} :red[r{i}]'
    )


def markdown_sources(at) -> list[str]:
    """Every string of every element that Streamlit renders as markdown, in the whole page."""
    texts: list[str] = []

    def strings(value) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                strings(item)
        elif isinstance(value, list):
            for item in value:
                strings(item)

    def walk(node) -> None:
        if getattr(node, "type", None) in PLAIN_ELEMENTS:
            return
        proto = getattr(node, "proto", None)
        if proto is not None and hasattr(proto, "DESCRIPTOR"):
            strings(MessageToDict(proto))
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)
    return texts


def assert_literal(at, names: list[str], *, shown: int = 1) -> str:
    """No markdown source holds an unescaped link; at least ``shown`` names appear escaped."""
    sources = markdown_sources(at)
    joined = "\n".join(sources)
    unescaped = re.sub(r"\\[!-/:-@\[-`{-~]", "", joined)  # drop every escaped character
    for construct in ("](", "![", "<img", "<a "):
        assert construct not in unescaped, [s for s in sources if construct in s]
    assert sum(md(name) in joined for name in names) >= shown, joined[:2000]
    return joined


@pytest.fixture
def hostile_app(app):
    labels = [hostile_label(i) for i in range(8)]
    upload_model(
        app,
        DEMO_WEIGHTS.read_bytes(),
        "demo_cnn.safetensors",
        "demo_cnn",
        labels="\n".join(labels).encode(),
    )
    assert app.session_state["model_ref"].kind == "upload", error_text(app)
    app.run()
    return app, labels


def test_hostile_class_names_are_literal_on_the_model_page(hostile_app):
    app, labels = hostile_app
    joined = assert_literal(app, labels)
    # The sidebar's top prediction is one of them, escaped.
    sidebar = " ".join(str(c.value) for c in app.sidebar.caption)
    assert any(f"**{md(name)}**" in sidebar for name in labels), sidebar
    assert "Class names from" in joined


def test_hostile_class_names_are_literal_on_the_explanation_pages(hostile_app):
    app, labels = hostile_app
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error, error_text(app)
    assert_literal(app, labels)
    target = {m.label: m.value for m in app.metric}["Target"]
    assert any(target.startswith(md(name)) for name in labels), target
    open_page(app, PAGE_CONVERGENCE)
    assert_literal(app, labels)


def test_hostile_file_names_are_literal_in_cards_and_errors(app):
    from apphelpers import png_bytes

    good = "![g](http://127.0.0.1:9/g.png) [ok](https://example.invalid).png"
    bad = "[broken](https://example.invalid/b) :material/home:.png"
    widget(app, "file_uploader", "_w_image_files").set_value(
        [(good, png_bytes(), "image/png"), (bad, b"not an image", "image/png")]
    )
    app.run()
    assert not app.exception
    assert app.session_state["images"][-1].name == good
    joined = assert_literal(app, [good, bad], shown=2)
    assert md(bad) in "\n".join(e.value for e in app.error)
    assert bad in error_text(app)
    assert md(good) in joined
