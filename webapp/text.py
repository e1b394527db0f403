"""Literal text: user strings shown in Streamlit markdown or Plotly figures exactly as written.

File names, class names from a labels file, module names and types of an uploaded model, and
the error messages that quote them are chosen by whoever uploads the files. Streamlit renders
markdown almost everywhere text appears (``st.markdown``, captions, alerts, metric labels and
values, expander labels, pills, tooltips), including links, images, its own directives
(``:red[..]``, ``:material/icon:``, ``:smile:``) and LaTeX (``$..$``); Plotly renders a subset of
HTML in figure text (``<a href>``, ``<b>``, ``<br>``, ``<span>``). Left as they are, such strings
can make the browser fetch outside images, show outside links or restyle the page. Every user
string therefore goes through :func:`md` before it joins markdown and :func:`html` before it joins
figure text. (Inline code is no refuge: Streamlit still rewrites icon short codes inside it.)

Selectbox and multiselect options and ``st.dataframe`` cells are shown as plain text by
Streamlit and need none of this.
"""

from __future__ import annotations

import re
import string

__all__ = ["WORD_JOINER", "html", "md"]

_PUNCTUATION = frozenset(string.punctuation)
# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
WORD_JOINER = "\u2060"
"""Invisible, zero-width, and no line break: what :func:`md` puts before ``:``, ``@`` and the
dot of ``www.``."""
# Streamlit's GFM support turns bare "https://...", "www...." and "name@host" into links after
# markdown is parsed, in the text that is left once backslash escapes are gone; a word joiner
# before the character each of those patterns needs keeps them from matching.
_UNLINK = re.compile(r"[:@]|(?<=[wW]{3})\.")


def _one_line(text: object) -> str:
    return _CONTROL.sub(" ", str(text))


def md(text: object) -> str:
    """Escape ``text`` so that Streamlit markdown shows it literally.

    Every ASCII punctuation character gets a backslash (CommonMark lets any of them be escaped,
    and a backslash before one is always removed), which disarms links, images, emphasis,
    headings, lists, code spans, HTML, Streamlit's directives (``:red[..]``, ``:material/..:``)
    and LaTeX. Bare web addresses and e-mail addresses are linked by Streamlit even when
    escaped, so an invisible :data:`WORD_JOINER` goes before every ``:`` and ``@`` and before
    the dot of ``www.``. Newlines and other control characters become spaces, so the text
    cannot start a new block.

    Parameters
    ----------
    text : object
        The user string (anything else is converted with ``str``).

    Returns
    -------
    str
        Markdown that renders as ``text`` on one line (plus invisible word joiners).
    """
    unlinked = _UNLINK.sub(lambda m: WORD_JOINER + m.group(0), _one_line(text))
    return "".join("\\" + char if char in _PUNCTUATION else char for char in unlinked)


def html(text: object) -> str:
    """Escape ``text`` for Plotly text: titles, tick labels, hover text, annotations.

    ``&``, ``<``, ``>`` and both quotes become character references that Plotly decodes back
    into the same characters after it has looked for tags, so no tag of the text takes effect.
    Quotes use numeric references because Plotly does not decode ``&quot;``. Newlines become
    spaces (Plotly breaks lines only at ``<br>``).

    Parameters
    ----------
    text : object
        The user string (anything else is converted with ``str``).

    Returns
    -------
    str
        Text that Plotly shows as ``text``.
    """
    return (
        _one_line(text)
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&#34;")
        .replace("'", "&#39;")
    )
