"""Glossary: every word the app uses, in plain words."""

from __future__ import annotations

import streamlit as st

import webapp
from webapp import glossary as G
from webapp import widgets as W
from webapp.text import md

ctx = webapp.setup()
W.page_header(
    "Glossary",
    "The words the app uses, explained without formulas. Where a page shows a formula such as "
    "F(image) − F(baseline), the entry says what it means in words.",
)

query = st.text_input(
    "Find a word",
    key="_w_glossary_query",
    placeholder="e.g. baseline, delta, Gauss-Legendre",
)
found = G.search(query)
if not found:
    st.info(f"No entry mentions {md(query.strip())!s}. Clear the search to see every word.")
for entry in found:
    with st.container(border=True, key=f"term_{entry.key.replace('-', '_')}"):
        st.markdown(f"#### {entry.name}")
        st.markdown(entry.text)
        others = [p for p in entry.phrases if p.lower() not in entry.name.lower()]
        if others:
            st.caption("Also written as: " + ", ".join(md(p) for p in others))
