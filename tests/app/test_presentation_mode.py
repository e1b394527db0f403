"""Presentation mode tucks every page's controls into expanders, and they keep working there.

Each test turns the mode on, checks that the page's blocks of controls sit in expanders (and the
results stay outside them), uses a control inside its fold, then turns the mode off and checks
that nothing the user set was lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from apphelpers import (
    PAGE_COMPARE,
    PAGE_CONDUCTANCE,
    PAGE_CONVERGENCE,
    PAGE_DATASET,
    PAGE_OVERVIEW,
    open_page,
    plotly_specs,
    widget,
)
from streamlit.testing.v1 import AppTest
from test_dataset_page import runs  # noqa: F401 - a fixture

from webapp import state as S
from webapp.compare import CompareSpec

SETTINGS = "Settings: target, baseline, steps"
SWEEP = "Sweep: methods and steps"
STORE = "Results store"
DATASET_VIEW = "Layer, images and grouping"
COMPARED = "What is compared, the panes and their colour scale"
COMPARE_SETTINGS = "Target, baseline and integration, shared by every pane"


# --- the page tree ------------------------------------------------------------------------------
def _nodes(node, folds: tuple[str, ...] = ()) -> Iterator[tuple[object, tuple[str, ...]]]:
    """Every element under ``node`` with the labels of the expanders around it, outermost first."""
    for child in getattr(node, "children", {}).values():
        inner = folds + (child.label,) if getattr(child, "type", None) == "expander" else folds
        yield child, folds
        yield from _nodes(child, inner)


def _folds(at: AppTest, match: Callable[[object], bool]) -> tuple[str, ...]:
    """The expanders around the one element of the page's main area that ``match`` picks."""
    found = [folds for node, folds in _nodes(at.main) if match(node)]
    assert len(found) == 1, f"{len(found)} elements match"
    return found[0]


def key_is(key: str) -> Callable[[object], bool]:
    return lambda node: getattr(node, "key", None) == key


def label_is(label: str) -> Callable[[object], bool]:
    return lambda node: getattr(node, "label", None) == label and not hasattr(node, "children")


def _form_widgets(at: AppTest) -> list[tuple[str, tuple[str, ...]]]:
    """(label, expanders around it) of every widget of a form in the main area."""
    return [
        (node.label, folds)
        for node, folds in _nodes(at.main)
        if getattr(node, "form_id", "") and not hasattr(node, "children")
    ]


def _present(at: AppTest, on: bool) -> AppTest:
    widget(at, "toggle", "_w_presentation").set_value(on).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state[S.PRESENTATION] is on
    return at


# --- the helper itself --------------------------------------------------------------------------
def _fold_script() -> None:
    import streamlit as st

    from webapp import presentation

    with presentation.controls("Outer") as box:
        st.number_input("inside", key="inside")
        with presentation.controls("Inner"):
            st.number_input("nested", key="nested")
        st.write("folded" if presentation.folded() else "open")
    box.number_input("added later", key="later")
    with presentation.controls("Always", always=True):
        st.number_input("always", key="always")
    st.write("folded" if presentation.folded() else "open")


def test_the_fold_is_an_expander_only_while_presenting_and_never_nested():
    at = AppTest.from_function(_fold_script)
    at.session_state[S.PRESENTATION] = True
    at.run()
    assert not at.exception
    assert [e.label for e in at.expander] == ["Outer", "Always"]  # no "Inner" in "Outer"
    assert _folds(at, key_is("inside")) == ("Outer",)
    assert _folds(at, key_is("nested")) == ("Outer",)
    assert _folds(at, key_is("later")) == ("Outer",)  # drawn into the box after it closed
    assert _folds(at, key_is("always")) == ("Always",)
    assert [m.value for m in at.markdown] == ["folded", "open"]
    # What is added to the box later is drawn in it, after what the block drew first.
    order = ["inside", "nested", "later", "always"]
    assert [n.key for n in at.number_input] == order

    at.number_input(key="nested").set_value(7).run()
    at.session_state[S.PRESENTATION] = False
    at.run()
    assert not at.exception
    assert [e.label for e in at.expander] == ["Always"]
    for key in ("inside", "nested", "later"):
        assert _folds(at, key_is(key)) == ()
    assert at.number_input(key="nested").value == 7  # the value set in the fold stays
    assert [m.value for m in at.markdown] == ["open", "open"]
    assert [n.key for n in at.number_input] == order


# --- the pages ----------------------------------------------------------------------------------
@pytest.mark.parametrize("page", [PAGE_CONDUCTANCE, PAGE_OVERVIEW])
def test_the_settings_form_folds_away_and_still_computes(app, page):
    prefix = "cond" if page == PAGE_CONDUCTANCE else "ovw"
    open_page(app, page)
    assert _folds(app, key_is(f"{prefix}_steps")) == ()
    _present(app, True)
    widgets = _form_widgets(app)
    assert widgets and all(folds == (SETTINGS,) for _, folds in widgets), widgets
    charts = plotly_specs(app)
    assert charts  # the results are drawn, outside any fold
    assert all(_folds(app, key_is(key)) == () for key in charts)

    app.number_input(key=f"{prefix}_steps").set_value(24)
    app.button(key=f"FormSubmitter:{prefix}_form-Compute").click().run()
    assert not app.exception
    assert app.session_state[S.SETTINGS].n_steps == 24
    _present(app, False)
    assert app.number_input(key=f"{prefix}_steps").value == 24
    assert SETTINGS not in [e.label for e in app.expander]


def test_the_convergence_page_folds_both_forms_and_the_sweep_still_runs(app):
    open_page(app, PAGE_CONVERGENCE)
    assert _folds(app, label_is("Methods")) == ()
    _present(app, True)
    assert _folds(app, label_is("Methods")) == (SWEEP,)
    assert _folds(app, label_is("Run sweep")) == (SWEEP,)
    assert _folds(app, key_is("conv_steps")) == (SETTINGS,)
    assert all(folds for _, folds in _form_widgets(app))  # no form left in the open
    assert _folds(app, key_is("conv_plot")) == ()

    steps = [m for m in app.multiselect if m.label == "n_steps"]
    assert len(steps) == 1
    steps[0].set_value([4, 16])
    app.button(key="FormSubmitter:sweep_form-Run sweep").click().run()
    assert not app.exception
    assert app.session_state[S.SWEEP].steps == (4, 16)
    _present(app, False)
    assert [e.label for e in app.expander if e.label in (SWEEP, SETTINGS)] == []
    assert [m for m in app.multiselect if m.label == "n_steps"][0].value == [4, 16]
    assert app.session_state[S.SWEEP].steps == (4, 16)


def test_the_dataset_page_folds_its_choices_and_keeps_them(app, runs, monkeypatch):  # noqa: F811
    monkeypatch.setenv("EXPLAINER_DATASET_DIR", str(runs))
    open_page(app, PAGE_DATASET)
    assert _folds(app, key_is("_w_ds_layer")) == ()
    _present(app, True)
    assert _folds(app, key_is("_w_ds_source")) == (STORE,)
    assert _folds(app, key_is("_w_ds_store")) == (STORE,)
    assert _folds(app, key_is("_w_ds_layer")) == (DATASET_VIEW,)
    assert _folds(app, key_is("_w_ds_slice")) == (DATASET_VIEW,)
    assert _folds(app, key_is("ds_heatmap")) == ()  # the heatmap stays in view

    app.selectbox(key="_w_ds_layer").set_value("block2").run()
    assert not app.exception
    assert app.session_state["_w_ds_layer"] == "block2"
    assert len(plotly_specs(app)["ds_heatmap"]["data"][0]["x"]) > 0
    _present(app, False)
    assert app.selectbox(key="_w_ds_layer").value == "block2"
    assert _folds(app, key_is("_w_ds_layer")) == ()
    assert _folds(app, key_is("_w_ds_store")) == ()


def test_an_empty_dataset_folder_says_where_the_store_choice_went(app, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLAINER_DATASET_DIR", str(tmp_path))
    app.session_state[S.PRESENTATION] = True
    open_page(app, PAGE_DATASET)
    assert "open **Results store** above" in " ".join(c.value for c in app.caption)


def test_the_compare_page_folds_every_choice_and_the_settings_once(app):
    app.session_state[S.SETTINGS] = S.AttributionSettings(target=2)
    open_page(app, PAGE_COMPARE)
    assert _folds(app, key_is("_w_cmp_mode")) == ()
    assert _folds(app, key_is("cmp_steps")) == (COMPARE_SETTINGS,)  # folded in any mode
    _present(app, True)
    for key in ("_w_cmp_mode", "_w_cmp_count", "_w_cmp_pane0", "_w_cmp_view", "_w_cmp_shared"):
        assert _folds(app, key_is(key)) == (COMPARED,), key
    # The settings form sits in the page's own expander, not in a second one inside it.
    assert _folds(app, key_is("cmp_steps")) == (COMPARE_SETTINGS,)
    assert SETTINGS not in [e.label for e in app.expander]
    assert all(_folds(app, key_is(f"cmp_map{i}")) == () for i in range(2))

    widget(app, "radio", "_w_cmp_view").set_value("sum").run()
    assert app.session_state[S.COMPARE].view == "sum"
    assert plotly_specs(app)["cmp_map0"]["layout"]["title"]["text"] == "all channels"
    _present(app, False)
    assert widget(app, "radio", "_w_cmp_view").value == "sum"
    assert app.session_state[S.COMPARE] == CompareSpec(
        "images", app.session_state[S.COMPARE].panes, view="sum"
    )
    assert _folds(app, key_is("_w_cmp_view")) == ()
