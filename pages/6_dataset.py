"""Dataset: what a whole dataset run (``explainer batch``) found, per class and per channel."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

import webapp
from explainer.batch.runner import BatchSettings
from explainer.limits import max_steps
from webapp import backend, presentation
from webapp import dataset as D
from webapp import report as RP
from webapp import state as S
from webapp import widgets as W
from webapp.text import md

TOP_K = 8

ctx = webapp.setup()
W.page_header(
    "Dataset",
    "A dataset run explains every image of a folder and keeps, per image and layer, each "
    "channel's conductance total and strongest activation. The heatmap shows the **mean "
    "conductance of each channel per class**: red channels push the class's score up, blue ones "
    "push it down. Click a cell to see the images that drive that channel hardest.",
)
folder = D.dataset_dir()


def _on_store() -> None:
    st.session_state[D.STORE] = ("folder", st.session_state.get("_w_ds_store"))


def _on_layer() -> None:
    st.session_state[D.NEURON] = (st.session_state.get("_w_ds_layer"), 0)
    st.session_state.pop("_ds_class", None)


# --- which store --------------------------------------------------------------------------------
def _choose_store() -> D.StoreData | None:
    """The source radio, the folder's list or the upload; the store read, or None (said why)."""
    chosen = st.session_state.get(D.STORE)
    if st.session_state.pop("_ds_show_folder", False):
        st.session_state["_w_ds_source"] = "folder"  # a run just finished: show its store
    source = st.radio(
        "Results store",
        ["folder", "upload"],
        format_func={"folder": "From the dataset folder", "upload": "Upload a store"}.get,
        horizontal=True,
        key="_w_ds_source",
    )
    if source == "upload":
        limit_mb = D.max_store_bytes() / 2**20
        upload = st.file_uploader(
            "A results store (.sqlite) written by `explainer batch`",
            type=["sqlite"],
            key="_w_ds_upload",
            max_upload_size=max(1, int(limit_mb)),
            help=f"At most {limit_mb:.0f} MB. It is read once, read-only, and not kept.",
        )
        if upload is None:
            st.info(
                "Upload the .sqlite file that `explainer batch --out FILE` wrote, or pick a "
                "store from the dataset folder."
            )
            return None
        st.session_state[D.STORE] = ("upload", upload.name)
        ok, data = W.attempt(
            f"Reading {upload.name}", D.load_upload, upload.name, upload.getvalue()
        )
        return data if ok else None

    ok, names = W.attempt("Listing the dataset folder", D.list_stores, folder)
    if not ok:
        return None
    if not names:
        st.info(
            f"There is no results store in the dataset folder, {md(folder)}, yet. Make one with "
            "`explainer batch --images DIR --labels-from-folders --out FOLDER/NAME.sqlite`, "
            "where FOLDER is that folder (set with the environment variable "
            f"{D.DATASET_DIR_ENV}); or explain this session's images with the form below; or "
            "upload a store.",
            icon=":material/info:",
        )
        return None
    current = chosen[1] if chosen and chosen[0] == "folder" and chosen[1] in names else names[-1]
    W.bind("_w_ds_store", current)
    name = st.selectbox(
        "Store",
        names,
        key="_w_ds_store",
        on_change=_on_store,
        help=f"The .sqlite files of the dataset folder ({D.DATASET_DIR_ENV}).",
    )
    st.session_state[D.STORE] = ("folder", name)
    ok, data = W.attempt(f"Reading {name}", D.load_store, folder, name)
    return data if ok else None


# --- runs started here --------------------------------------------------------------------------
def _start_run() -> None:
    if ctx.lm is None or not ctx.images:
        return
    steps = int(st.session_state.get("_w_ds_steps") or 16)
    try:
        job = D.start_run(
            folder,
            ctx.lm.source,
            D.image_bytes_of(ctx.images),
            BatchSettings(n_steps=steps),
            backend.executor(),
        )
    except D.DatasetViewError as exc:
        st.session_state["_ds_run_error"] = str(exc)
        return
    st.session_state[D.JOB] = job


def _run_form(expanded: bool) -> None:
    with st.expander("Explain this session's images into a new store", expanded=expanded):
        if ctx.lm is None:
            st.info("No model is ready: load one on the Model & images page first.")
            return
        if not ctx.images:
            st.info("There are no images in this session: add some on the Model & images page.")
            return
        st.caption(
            f"{len(ctx.images)} image(s) of this session, explained with {md(ctx.lm.name)} "
            "for the class each is predicted as, at the model's suggested layers, into a new "
            f"store in the dataset folder. Images have no true class here, so the correct and "
            "misclassified slices need a run of `explainer batch --labels-from-folders`."
        )
        c1, c2 = st.columns([1, 3])
        c1.number_input(
            "n_steps", min_value=1, max_value=max_steps(), value=16, step=8, key="_w_ds_steps"
        )
        running = st.session_state.get(D.JOB) is not None
        c2.button(
            "Start the run",
            type="primary",
            on_click=_start_run,
            disabled=running,
            key="_w_ds_start",
        )
        message = st.session_state.pop("_ds_run_error", None)
        if message:
            st.error(f"**The run could not start.** {md(message)}", icon=":material/error:")


@st.fragment(run_every=1.0)
def _progress() -> None:
    job: D.RunJob | None = st.session_state.get(D.JOB)
    if job is None:
        return
    if not job.finished:
        fraction = min(1.0, job.done / job.total) if job.total else 0.0
        text = f"Explaining image {job.done} of {job.total}"
        if job.stop.is_set():
            text += " (stopping...)"
        st.progress(fraction, text=text)
        if st.button("Stop the run", key="_w_ds_stop", disabled=job.stop.is_set()):
            job.stop.set()
        return
    st.session_state.pop(D.JOB, None)
    if job.error:
        S.flash(
            "error",
            f"**The run stopped with an error.** {md(job.error)} What it finished is kept in "
            f"{md(job.store_name)}.",
        )
    else:
        summary = job.summary
        how = "was stopped" if summary and summary.interrupted else "finished"
        counts = (
            f": {summary.ok} explained, {summary.bad} unreadable, {summary.failed} failed"
            if summary
            else ""
        )
        S.flash("success", f"The run {how}{counts}. Showing {md(job.store_name)}.")
    st.session_state[D.STORE] = ("folder", job.store_name)
    st.session_state["_ds_show_folder"] = True
    st.rerun(scope="app")


with presentation.controls("Results store", expanded=st.session_state.get(D.STORE) is None):
    data = _choose_store()
if data is None and presentation.active():
    st.caption("No results store is open: open **Results store** above to pick or upload one.")
_run_form(expanded=data is None)
if st.session_state.get(D.JOB) is not None:
    _progress()
if data is None:
    st.stop()


# --- the store ----------------------------------------------------------------------------------
counts = data.counts
st.caption(
    f"{md(data.name)} · model {md(data.model)} · {counts.get('ok', 0)} image(s) explained, "
    f"{counts.get('bad', 0)} unreadable, {counts.get('failed', 0)} failed"
    + (f" · {md(D.describe_settings(data.settings))}" if data.settings else "")
)
if data.problems:
    with st.expander(f"{len(data.problems)} image(s) without results"):
        st.dataframe(
            pd.DataFrame(data.problems, columns=["image", "status", "reason"]),
            hide_index=True,
            width="stretch",
        )
if not data.layers or not data.paths:
    st.info(
        "This store holds no explained image yet. If its run is still going, come back later; "
        "otherwise run `explainer batch` again with the same settings to resume it."
    )
    st.stop()

layers = list(data.layers)
focus = st.session_state.pop(D.FOCUS, None)  # sent here by the Neuron card
if focus is not None and focus[0] in layers:
    st.session_state[D.NEURON] = (focus[0], int(focus[1]))
    st.info(
        f"Opened from the neuron card on layer **{md(focus[0])}**, channel **{int(focus[1])}**: "
        "the images below are the ones where this channel's conductance is strongest."
    )
elif focus is not None:
    st.info(
        f"Opened from the neuron card, but this store has no results for layer "
        f"**{md(focus[0])}**; it holds {md(', '.join(layers))}. Run `explainer batch` with "
        f"the option {md('--layers ' + str(focus[0]))} to add it, or pick one of these layers."
    )
neuron = st.session_state.get(D.NEURON)
layer_now = neuron[0] if neuron and neuron[0] in layers else layers[-1]
with presentation.controls("Layer, images and grouping"):
    c1, c2, c3 = st.columns([2, 3, 2])
W.bind("_w_ds_layer", layer_now)
layer = c1.selectbox("Layer", layers, key="_w_ds_layer", on_change=_on_layer)
labelled = data.has_true_labels
slice_name = c2.radio(
    "Images",
    list(D.SLICES),
    format_func=D.SLICES.get,
    horizontal=True,
    key="_w_ds_slice",
    disabled=not labelled,
    help="Correct and misclassified compare each image's true class (its class folder) with "
    "the class the model predicts.",
)
if not labelled:
    slice_name = "all"
by = c3.radio(
    "Group by",
    ["true", "predicted"] if labelled else ["predicted"],
    format_func={"true": "True class", "predicted": "Predicted class"}.get,
    horizontal=True,
    key=f"_w_ds_by_{int(labelled)}",  # the choices differ with and without true labels
)
if not labelled:
    st.caption(
        "This store has no true labels (its run did not use --labels-from-folders), so images "
        "are grouped by the class the model predicts and cannot be split into correct and "
        "misclassified."
    )

mask = D.slice_mask(data, slice_name)
layer_data = data.layers[layer]
channels = layer_data.channels
if neuron is None or neuron[0] != layer or not (0 <= neuron[1] < channels):
    neuron = (layer, 0)
    st.session_state[D.NEURON] = neuron
channel = int(neuron[1])
if not mask.any():
    st.info(f"No image of this store is in the slice “{D.SLICES[slice_name]}”. Pick another slice.")
else:
    classes, means, class_counts = D.class_matrix(data, layer, mask, by)
    rows, shown, z = D.heatmap_view(classes, means, class_counts)
    names = [f"{data.class_name(c)} ({class_counts[classes.index(c)]})" for c in rows]
    st.subheader("Mean conductance per class and channel")
    note = f"{int(mask.sum())} image(s) in the slice; rows are {by} classes (image counts)."
    if len(shown) < channels:
        note += f" The {len(shown)} channels with the largest means of {channels} are drawn."
    if len(rows) < len(classes):
        note += f" The {len(rows)} classes with the most images of {len(classes)} are drawn."
    st.caption(note)

    def _on_click() -> None:
        picked = W.clicked_data("ds_heatmap")
        if picked and len(picked) == 2:
            st.session_state[D.NEURON] = (st.session_state.get("_w_ds_layer"), int(picked[1]))
            st.session_state["_ds_class"] = int(picked[0])

    selected_class = st.session_state.get("_ds_class")
    figure = D.class_heatmap(names, rows, shown, z, (selected_class, channel))
    W.plotly_click(figure, "ds_heatmap", _on_click)

    st.subheader("The channels that matter most for each class")
    top = list(D.top_channels(classes, means, k=5))
    table = pd.DataFrame(
        [(data.class_name(c), rank, ch, value) for c, rank, ch, value in top],
        columns=["class", "rank", "channel", "mean conductance"],
    )
    st.dataframe(table, hide_index=True, width="stretch", height=min(420, 38 + 35 * len(table)))

    def _dataset_view() -> RP.ReportView:
        """The heatmap and the table as a report view (the store's own model and images, not
        the session's): every class's mean conductance, and what the heatmap draws of it."""
        return RP.page_view(
            "dataset",
            f"Dataset {data.name}: mean conductance per class and channel of {layer}",
            ctx=None,
            layer=layer,
            target=f"each image's {by} class",
            settings=(
                ("Store", data.name),
                ("Model of the run", data.model),
                ("Images", D.SLICES[slice_name]),
                ("Grouped by", "true class" if by == "true" else "predicted class"),
                (
                    "Classes (the rows of mean_conductance, in order)",
                    ", ".join(f"{data.class_name(c)} (#{c})" for c in classes),
                ),
                *((str(k), str(v)) for k, v in sorted(data.settings.items())),
            ),
            summary=(("Images in the slice", str(int(mask.sum()))),),
            arrays={
                "mean_conductance": np.asarray(means, dtype=np.float64),
                "classes": np.asarray(classes, dtype=np.int64),
                "image_counts": np.asarray(class_counts, dtype=np.int64),
                "heatmap": np.asarray(z, dtype=np.float64),
                "heatmap_classes": np.asarray(rows, dtype=np.int64),
                "heatmap_channels": np.asarray(shown, dtype=np.int64),
                "top_class": np.array([t[0] for t in top], dtype=np.int64),
                "top_rank": np.array([t[1] for t in top], dtype=np.int64),
                "top_channel": np.array([t[2] for t in top], dtype=np.int64),
                "top_mean_conductance": np.array([t[3] for t in top], dtype=np.float64),
            },
            dims={
                "mean_conductance": ("class_row", "channel"),
                "classes": ("class_row",),
                "image_counts": ("class_row",),
                "heatmap": ("heatmap_row", "heatmap_column"),
                "heatmap_classes": ("heatmap_row",),
                "heatmap_channels": ("heatmap_column",),
                "top_class": ("row",),
                "top_rank": ("row",),
                "top_channel": ("row",),
                "top_mean_conductance": ("row",),
            },
            figures=[
                (
                    "class_channel_heatmap",
                    "Mean conductance per class and channel",
                    note,
                    figure,
                )
            ],
        )

    W.view_actions("ds", _dataset_view)


# --- one neuron ---------------------------------------------------------------------------------
st.subheader("The images that drive a channel hardest")


def _on_channel() -> None:
    value = st.session_state.get("_w_ds_channel")
    if value is not None:
        st.session_state[D.NEURON] = (st.session_state.get("_w_ds_layer"), int(value))


c1, c2 = st.columns([1, 3])
W.bind("_w_ds_channel", channel)
c1.number_input(
    f"Channel of {md(layer)}",
    min_value=0,
    max_value=max(0, channels - 1),
    step=1,
    key="_w_ds_channel",
    on_change=_on_channel,
    help="Or click a cell of the heatmap.",
)
c2.info(
    f"Selected: layer **{md(layer)}**, channel **{channel}** · ranked by its strongest "
    f"activation in each image ({D.SLICES[slice_name].lower()}).",
    icon=":material/my_location:",
)
ranked = D.top_images(data, layer, channel, mask, k=TOP_K)
if not ranked:
    st.info("No image in this slice has results for this channel.")
else:
    index = {path: i for i, path in enumerate(data.paths)}
    thumbs = [D.thumbnail(data, path) for path, _ in ranked]
    if any(t is not None for t in thumbs):
        per_row = 4  # legible names at 1024 px wide
        for start in range(0, len(ranked), per_row):
            cols = st.columns(per_row)
            for n in range(start, min(start + per_row, len(ranked))):
                path, value = ranked[n]
                with cols[n - start]:
                    if thumbs[n] is not None:
                        st.image(thumbs[n], width="stretch")
                    else:
                        st.caption(":material/hide_image: file not reachable")
                    st.caption(f"**{n + 1}** · {md(path)} · {value:.3g}")
    else:
        st.caption(
            "The image files are not reachable from the server (an uploaded store, or files "
            "that moved), so they are listed by name."
        )
    rows_out = []
    for n, (path, value) in enumerate(ranked, start=1):
        i = index[path]
        rows_out.append(
            (
                n,
                path,
                value,
                data.class_name(data.true[i]) if data.true[i] >= 0 else "",
                data.class_name(data.predicted[i]) if data.predicted[i] >= 0 else "",
                float(layer_data.conductance[i, channel]),
            )
        )
    st.dataframe(
        pd.DataFrame(
            rows_out,
            columns=["rank", "image", "strongest activation", "true", "predicted", "conductance"],
        ),
        hide_index=True,
        width="stretch",
    )
