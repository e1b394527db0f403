"""Convergence: does the conductance add up, and how many integration steps does it take?"""

from __future__ import annotations

import pandas as pd
import streamlit as st

import webapp
from webapp import backend, presentation
from webapp import figures as F
from webapp import glossary as G
from webapp import report as RP
from webapp import state as S
from webapp import widgets as W
from webapp.text import md

STEP_CHOICES = S.SWEEP_STEPS
# Sweeps cheaper than this (parameters x total steps) run without a click.
AUTO_RUN_BUDGET = 2e9

ctx = webapp.setup()
W.page_header(
    "Convergence",
    "Conductance is an integral approximated with a finite number of steps. Completeness says "
    "the conductance of a layer sums to F(image) − F(baseline); the **delta** is how far the "
    "sum misses it. A delta that is small relative to the score difference means the maps can "
    "be trusted; a large one means: use more steps or a better integration method.",
)
G.explain(
    "score-difference", "delta", "steps", "integration-method", label="The words on this page"
)
lm, image, prep, layer = W.require_usable_layer(ctx)

settings = W.settings_form(ctx, "conv", auto_steps=True)


def _sync_tolerance() -> None:
    st.session_state[S.TOLERANCE] = float(st.session_state["_w_tolerance"]) / 100.0


W.bind("_w_tolerance", round(float(S.get(S.TOLERANCE)) * 100.0, 4))
st.number_input(
    "Tolerance: largest acceptable |delta|, in % of |F(image) − F(baseline)|",
    min_value=0.001,
    max_value=100.0,
    step=0.5,
    format="%.3f",
    key="_w_tolerance",
    on_change=_sync_tolerance,
)
tolerance = float(S.get(S.TOLERANCE))

# --- per image ----------------------------------------------------------------------------------
st.subheader("Per image")
st.caption(
    f"Layer {md(layer)}, {S.METHOD_NAMES.get(settings.method, settings.method)} with "
    f"{settings.n_steps} steps, baseline: {S.BASELINE_NAMES.get(settings.baseline)}. "
    f"Target: {md(W.target_setting_text(lm, settings))}."
)
request = f"{backend.model_key(lm)}|{ctx.prep!r}|{layer}|{settings!r}"
checking = st.session_state.get(S.CHECK_ALL) == request


def _check_all(on: bool) -> None:
    st.session_state[S.CHECK_ALL] = request if on else None


def _row(entry: S.ImageEntry, result: object) -> dict:
    passed = result.relative_delta <= tolerance
    return {
        "image": entry.name,
        "target": W.target_label(lm, result.target),
        "F(x) − F(baseline)": result.output_diff,
        "sum of conductance": float(result.channel_totals.sum()),
        "delta": result.delta,
        "|delta| relative": result.relative_delta,
        "status": "✓ pass" if passed else "⚠ warn",
    }


results: dict[str, dict] = {}
shown_errors: set[str] = set()
missing: list[S.ImageEntry] = []
for entry in ctx.images:
    if entry.digest == image.digest:
        with W.progress_bar(f"{entry.name}: integrating") as report:
            ok, result = W.attempt_each(
                f"Conductance for {entry.name}",
                shown_errors,
                backend.conductance,
                lm,
                entry,
                prep,
                layer,
                settings,
                report,
            )
    else:
        ok, result = W.attempt_each(
            f"Looking up {entry.name}",
            shown_errors,
            backend.conductance_cached,
            lm,
            entry,
            prep,
            layer,
            settings,
        )
        if ok and result is None:
            missing.append(entry)
            continue
    if ok and result is not None:
        results[entry.digest] = _row(entry, result)

if missing and checking:
    stop_slot = st.empty()
    stop_slot.button(
        "Stop checking",
        icon=":material/stop_circle:",
        key="stop_checking",
        on_click=_check_all,
        args=(False,),
        help="Stops the image being computed now; the images already checked are kept.",
    )
    for n, entry in enumerate(missing, start=1):
        with W.progress_bar(f"Image {n} of {len(missing)} ({entry.name}): integrating") as report:
            ok, result = W.attempt_each(
                f"Conductance for {entry.name}",
                shown_errors,
                backend.conductance,
                lm,
                entry,
                prep,
                layer,
                settings,
                report,
            )
        if ok and result is not None:
            results[entry.digest] = _row(entry, result)
    missing = []
    st.session_state[S.CHECK_ALL] = None
    stop_slot.empty()

rows = [results[e.digest] for e in ctx.images if e.digest in results]
if rows:
    table = pd.DataFrame(rows)
    passes = int((table["status"] == "✓ pass").sum())
    warns = len(rows) - passes
    b1, b2, _ = st.columns([1, 1, 4])
    with b1:
        st.badge(f"{passes} pass", icon=":material/check:", color="green")
    with b2:
        st.badge(f"{warns} warn", icon=":material/warning:", color="orange" if warns else "gray")
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        height=W.table_height(len(table)),
        column_config={
            "F(x) − F(baseline)": st.column_config.NumberColumn(format="%.4g"),
            "sum of conductance": st.column_config.NumberColumn(format="%.4g"),
            "delta": st.column_config.NumberColumn(format="%.3e"),
            "|delta| relative": st.column_config.NumberColumn(format="percent"),
        },
    )
    if warns:
        st.caption(
            "For images marked warn, raise n_steps or switch to Gauss-Legendre; the sweep below "
            "shows how many steps are needed."
        )
if missing and not checking:
    others = len(missing)
    st.caption(
        f"Only the image you are looking at is computed by itself. {others} other "
        f"image{'s' if others != 1 else ''} of this session "
        f"{'are' if others != 1 else 'is'} not checked yet with these settings."
    )
    st.button(
        f"Check {'all ' if others > 1 else ''}{others} other image{'s' if others != 1 else ''}",
        icon=":material/playlist_play:",
        key="check_all_images",
        on_click=_check_all,
        args=(True,),
        help="Computes the conductance of every image with the settings above, one after "
        "another, with a Stop button. Results are kept for this session.",
    )


# --- sweep --------------------------------------------------------------------------------------
st.subheader(f"How many steps are enough? ({md(image.name)})")
st.caption(
    "The delta for each integration method as the number of steps grows (both axes "
    "logarithmic). Where a line crosses the dashed tolerance, that many steps are enough for "
    "this image and layer."
)
sweep_settings: S.SweepSettings = S.get(S.SWEEP)
with presentation.controls("Sweep: methods and steps"), st.form("sweep_form"):
    methods = st.multiselect(
        "Methods",
        list(S.METHODS),
        default=[m for m in sweep_settings.methods if m in S.METHODS],
        format_func=lambda m: S.METHOD_NAMES.get(m, m),
    )
    c2, c3 = st.columns([3, 1], vertical_alignment="bottom")
    steps = c2.multiselect(
        "n_steps",
        list(STEP_CHOICES),
        default=[s for s in sweep_settings.steps if s in STEP_CHOICES],
    )
    relative = c3.toggle("Relative |delta|", value=sweep_settings.relative)
    run = st.form_submit_button("Run sweep", type="primary")
if run:
    st.session_state[S.SWEEP] = S.SweepSettings(
        methods=tuple(methods),
        steps=tuple(sorted(int(s) for s in steps)),
        relative=bool(relative),
    )
sweep_settings = S.get(S.SWEEP)
relative = sweep_settings.relative

if not sweep_settings.methods or not sweep_settings.steps:
    st.info("Pick at least one method and one number of steps, then run the sweep.")
else:
    cost = lm.num_params * sum(sweep_settings.steps) * len(sweep_settings.methods)
    ok, points = W.attempt(
        "Looking up the sweep",
        backend.sweep_cached,
        lm,
        image,
        prep,
        layer,
        settings,
        sweep_settings.methods,
        sweep_settings.steps,
    )
    if ok and points is None and (run or cost <= AUTO_RUN_BUDGET):
        with W.progress_bar("Sweep", unit="runs") as report:
            ok, points = W.attempt(
                "Running the sweep",
                backend.sweep,
                lm,
                image,
                prep,
                layer,
                settings,
                sweep_settings.methods,
                sweep_settings.steps,
                report,
            )
    if ok and points is None:
        st.info("Press **Run sweep** to compute the delta for every method and step count.")
    elif ok and points:
        ok_diff, base = W.attempt(
            "Computing conductance", backend.conductance, lm, image, prep, layer, settings
        )
        diff = abs(base.output_diff) if ok_diff and base is not None else None
        data = [
            (p.method, p.n_steps, p.relative_delta if relative else abs(p.delta)) for p in points
        ]
        line = tolerance if relative else (tolerance * diff if diff is not None else None)
        W.plotly_static(
            F.convergence_plot(
                data, method_names=S.METHOD_NAMES, tolerance=line, relative=relative
            ),
            key="conv_plot",
        )
        verdicts = []
        for method in sweep_settings.methods:
            enough = [
                p.n_steps for p in points if p.method == method and p.relative_delta <= tolerance
            ]
            name = S.METHOD_NAMES.get(method, method)
            verdicts.append(
                f"- **{name}**: {min(enough)} steps reach the tolerance."
                if enough
                else f"- **{name}**: not within tolerance up to {max(sweep_settings.steps)} steps."
            )
        st.markdown("\n".join(verdicts))
        W.view_actions("conv", lambda: RP.convergence_view(ctx, layer, settings, points, tolerance))
        with st.expander("Sweep values"):
            st.dataframe(
                pd.DataFrame(
                    {
                        "method": [S.METHOD_NAMES.get(p.method, p.method) for p in points],
                        "n_steps": [p.n_steps for p in points],
                        "delta": [p.delta for p in points],
                        "|delta| relative": [p.relative_delta for p in points],
                    }
                ),
                hide_index=True,
                width="stretch",
                height=W.table_height(len(points)),
                column_config={
                    "delta": st.column_config.NumberColumn(format="%.3e"),
                    "|delta| relative": st.column_config.NumberColumn(format="percent"),
                },
            )

st.divider()
cols = st.columns(2)
with cols[0]:
    st.page_link(W.PAGE_NEURON, label="Neuron gradient", icon=":material/arrow_back:")
with cols[1]:
    st.page_link(
        W.PAGE_MODEL,
        label="Start again with another model or image",
        icon=":material/restart_alt:",
    )
