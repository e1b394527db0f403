"""Report: the views collected from the pages, written out as one HTML file or a PDF."""

from __future__ import annotations

import streamlit as st

import webapp
from webapp import export
from webapp import report as R
from webapp import state as S
from webapp import widgets as W
from webapp.text import md

# Session key of the last PDF made, ``(signature, bytes)``: a changed report makes a new one.
PDF_KEY = "_report_pdf"

ctx = webapp.setup()
W.page_header(
    "Report",
    "A review report of the views you collected: one HTML file that opens offline in any "
    "browser (the figures stay interactive), or a PDF. Each view records the model and its "
    "digest, the image and the prediction, the layer, the maps, the convergence verdict and "
    "every setting, so someone who never used this app can follow it.",
)

views: list[R.ReportView] = list(S.get(S.REPORT_VIEWS) or [])
if not views:
    st.info(
        "The report is empty, so there is nothing to download yet. Open the Layer conductance, "
        "Neuron gradient or Convergence page and press **Add this view to the report** under "
        "the maps; each press keeps a snapshot of what the page shows then.",
        icon=":material/info:",
    )
    cols = st.columns(3)
    with cols[0]:
        st.page_link(W.PAGE_CONDUCTANCE, label="Layer conductance", icon=":material/grid_on:")
    with cols[1]:
        st.page_link(W.PAGE_NEURON, label="Neuron gradient", icon=":material/my_location:")
    with cols[2]:
        st.page_link(W.PAGE_CONVERGENCE, label="Convergence", icon=":material/trending_down:")
    st.stop()


# --- title and notes ----------------------------------------------------------------------------
def _sync_text() -> None:
    ss = st.session_state
    ss[S.REPORT_TITLE] = str(ss.get("_w_report_title", "") or "")[:200]
    ss[S.REPORT_NOTES] = str(ss.get("_w_report_notes", "") or "")[:20_000]


W.bind("_w_report_title", S.get(S.REPORT_TITLE))
W.bind("_w_report_notes", S.get(S.REPORT_NOTES))
st.text_input("Title", key="_w_report_title", max_chars=200, on_change=_sync_text)
st.text_area(
    "Notes for the reader",
    key="_w_report_notes",
    max_chars=20_000,
    placeholder="What was checked, what you concluded, what to look at first…",
    on_change=_sync_text,
    help="Printed at the top of the report, as plain text.",
)


# --- the collected views ------------------------------------------------------------------------
def _move(index: int, step: int) -> None:
    st.session_state[S.REPORT_VIEWS] = R.move(S.get(S.REPORT_VIEWS) or [], index, step)


def _remove(index: int) -> None:
    st.session_state[S.REPORT_VIEWS] = R.remove(S.get(S.REPORT_VIEWS) or [], index)


def _clear() -> None:
    st.session_state[S.REPORT_VIEWS] = []


st.subheader(f"Views in the report ({len(views)})")
for i, view in enumerate(views):
    with st.container(border=True):
        text, up, down, drop = st.columns([9, 1, 1, 1], vertical_alignment="center")
        with text:
            st.markdown(f"**{i + 1}. {md(view.title)}**")
            bits = [R.KINDS.get(view.kind, view.kind), f"layer {md(view.layer)}"]
            if view.verdict is not None:
                verdict = "converged" if view.verdict.passed else "not converged"
                bits.append(f"{verdict} ({view.verdict.relative_delta:.2%} of the difference)")
            bits.append(f"{len(view.figures)} figures · collected {view.created}")
            st.caption(" · ".join(bits))
        up.button(
            "",
            icon=":material/arrow_upward:",
            key=f"_w_report_up_{i}",
            help="Move up",
            on_click=_move,
            args=(i, -1),
            disabled=i == 0,
        )
        down.button(
            "",
            icon=":material/arrow_downward:",
            key=f"_w_report_down_{i}",
            help="Move down",
            on_click=_move,
            args=(i, 1),
            disabled=i == len(views) - 1,
        )
        drop.button(
            "",
            icon=":material/delete:",
            help="Remove from the report",
            key=f"_w_report_remove_{i}",
            on_click=_remove,
            args=(i,),
        )
with st.popover("Remove every view", icon=":material/delete_sweep:"):
    st.markdown("This empties the report. The pages themselves keep all your choices.")
    st.button("Yes, remove every view", key="_w_report_clear", on_click=_clear, type="primary")

# --- downloads ----------------------------------------------------------------------------------
st.subheader("Download")
title = S.get(S.REPORT_TITLE) or "Layer explainer review report"
notes = S.get(S.REPORT_NOTES) or ""
stem = R.file_stem(title)
ok, html = W.attempt("Building the HTML report", R.build_html, views, title, notes)
signature = (tuple(id(v) for v in views), title, notes)

left, right = st.columns(2, gap="large")
with left:
    st.download_button(
        "Download HTML",
        data=html.encode("utf-8") if ok and html else b"",
        file_name=f"{stem}.html",
        mime="text/html",
        icon=":material/html:",
        type="primary",
        disabled=not ok,
        on_click="ignore",
        key="_w_report_html",
        width="stretch",
    )
    if ok and html:
        st.caption(
            f"{len(html.encode('utf-8')) / 2**20:.1f} MB, self-contained: opens offline in any "
            "browser and loads nothing from the network."
        )
with right:
    if not export.chromium_available():
        st.info(
            "The PDF is printed by Chromium, which is not installed on this server. Install it "
            "with `apt-get install chromium` and restart the app. The HTML report works without "
            "it, and your browser can print it to PDF too.",
            icon=":material/info:",
        )
    else:
        made = st.session_state.get(PDF_KEY)
        pdf = made[1] if made and made[0] == signature else None
        if pdf is None:
            if st.button(
                "Create PDF",
                icon=":material/picture_as_pdf:",
                key="_w_report_make_pdf",
                width="stretch",
                disabled=not ok,
            ):
                with st.spinner("Printing the report with Chromium…"):
                    done, pdf = W.attempt("Printing the PDF", R.build_pdf, html)
                if done and pdf:
                    st.session_state[PDF_KEY] = (signature, pdf)
                else:
                    pdf = None
                    st.caption("Your views are kept: try again, or download the HTML report.")
        if pdf is not None:
            st.download_button(
                "Download PDF",
                data=pdf,
                file_name=f"{stem}.pdf",
                mime="application/pdf",
                icon=":material/picture_as_pdf:",
                on_click="ignore",
                key="_w_report_pdf",
                width="stretch",
            )
            st.caption(f"{len(pdf) / 2**20:.1f} MB, A4.")
