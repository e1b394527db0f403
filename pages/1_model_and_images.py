"""Model & images: choose the model, the preprocessing and the images every other page explains."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pandas as pd
import streamlit as st

import webapp
from explainer.errors import ExplainerError, ModelLoadError
from explainer.images import Preprocessing
from explainer.intake import describe_model, list_architectures, load_labels, pickle_allowed
from explainer.intake.registry import offered_architectures
from explainer.limits import max_image_bytes, max_images, max_label_bytes, max_session_image_bytes
from webapp import backend, urlstate
from webapp import figures as F
from webapp import state as S
from webapp import widgets as W
from webapp.text import md

MODEL_TYPES = ["pt", "pth", "pt2", "bin", "ckpt", "tar", "safetensors", "pkl"]
LABEL_TYPES = ["txt", "json", "csv"]
IMAGE_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"]
FROM_FILE = ""

ctx = webapp.setup()
W.page_header(
    "Model & images",
    "Pick the network to look inside and the pictures to show it. The cards at the bottom show "
    "**what the model sees** (the image after resizing) and its five most likely classes: start "
    "with an image the model gets right, then ask *why* on the next pages.",
)


# --- model --------------------------------------------------------------------------------------
def _use_builtin() -> None:
    if st.session_state.get("_w_model_source") == "builtin" and S.get(S.MODEL).kind != "builtin":
        st.session_state[S.MODEL] = S.ModelRef()
        st.session_state[S.LABELS] = None
        st.session_state[S.SETTINGS] = replace(S.get(S.SETTINGS), target=None, position=None)
        S.set_layer(None)
        S.flash("success", "Switched to the built-in demo model.")
        if not S.get(S.IMAGES):
            st.session_state[S.IMAGES] = W.load_samples()
            st.session_state.pop("_w_samples", None)  # the picker shows them again


def _set_samples_aside() -> None:
    """Sample images are drawings of shapes made for the demo model: with the user's own model
    and images of their own, they leave the working set (nothing is computed for them), and the
    page says how to bring them back. Until the user has an image, they stay."""
    images = list(S.get(S.IMAGES))
    samples = [e for e in images if e.source == "sample"]
    if not samples:
        return
    if all(e.source == "sample" for e in images):
        S.flash(
            "info",
            "The demo model's sample images stay until you upload images of your own; they are "
            "drawings of shapes made for the built-in model, so expect odd predictions on them.",
        )
        return
    st.session_state[S.IMAGES] = [e for e in images if e.source != "sample"]
    st.session_state["_w_samples"] = []
    count = len(samples)
    S.flash(
        "info",
        f"The {count} sample image{'s' if count != 1 else ''} of the demo model "
        f"{'were' if count != 1 else 'was'} set aside: they are drawings of shapes made for the "
        "built-in model. Upload your own images below, or pick samples again under "
        "**Sample images**.",
    )


def _load_upload(file, arch: str, num_classes: int, labels_file) -> None:
    """Load an uploaded model; switch to it only when everything (model and labels) worked."""
    data = file.getvalue()
    ref = S.ModelRef(
        kind="upload",
        digest=hashlib.sha256(data).hexdigest(),
        filename=file.name,
        arch=arch or None,
        num_classes=int(num_classes) or None,
        data=data,
    )
    st.session_state[S.ARCH_OFFER] = None
    refusals: list[str] = []

    def resolve(ref: S.ModelRef) -> backend.ServedModel:
        try:
            return backend.resolve_model(ref)
        except ModelLoadError as exc:
            refusals.append(str(exc))
            raise

    ok, lm = W.attempt(f"Loading {file.name}", resolve, ref)
    if not ok or lm is None:
        offered = offered_architectures(refusals[0]) if refusals else []
        if offered:
            st.session_state[S.ARCH_OFFER] = (ref.digest, tuple(offered))
        st.info("The previous model is still in use.")
        return
    labels = None
    if labels_file is not None:
        ok, names = W.attempt(
            f"Reading the labels in {labels_file.name}",
            load_labels,
            labels_file.getvalue(),
            num_classes=lm.num_classes,
        )
        if not ok or names is None:
            st.info("The previous model is still in use.")
            return
        labels = S.LabelsOverride(
            labels_file.name,
            tuple(names),
            digest=hashlib.sha256(labels_file.getvalue()).hexdigest(),
        )
    with st.spinner("Checking the model on a test input..."):
        ok, _ = W.attempt("Checking the model on a test input", backend.tree, lm)
        if ok:
            ok, _ = W.attempt("Checking the model's scores", backend.score_shape, lm)
    if not ok:
        st.info("The previous model is still in use.")
        return
    # Kept on disk by digest, so a reload, a restart or a shared link finds the files again.
    urlstate.keep_upload(data, "model", file.name)
    if labels is not None:
        urlstate.keep_upload(labels_file.getvalue(), "labels", labels_file.name)
    urlstate.model_loaded(ref)
    st.session_state[S.MODEL] = ref
    st.session_state[S.LABELS] = labels
    _set_samples_aside()
    st.session_state[S.SETTINGS] = replace(S.get(S.SETTINGS), target=None, position=None)
    S.set_layer(None)
    S.flash("success", f"Loaded **{md(file.name)}** ({md(lm.arch)}, {lm.num_params:,} parameters).")
    st.rerun()


def _pick_architecture(name: str) -> None:
    st.session_state["_w_arch"] = name  # the form shows the choice, as if picked there
    st.session_state[S.ARCH_PICK] = name


def _offer_architectures(file) -> None:
    """After a weights-only file failed to load as it was, one button per architecture that
    fits it: a click loads the file with that architecture, keeping everything else."""
    offer = S.get(S.ARCH_OFFER)
    if not offer or file is None or offer[0] != hashlib.sha256(file.getvalue()).hexdigest():
        return
    names = offer[1]
    which = "these architectures" if len(names) > 1 else "this architecture"
    st.markdown(f"**The file's weights fit {which}:** pick the one the network was trained with.")
    cols = st.columns(min(len(names), 4))
    for i, name in enumerate(names):
        cols[i % len(cols)].button(
            f"Use {name}",
            key=f"_w_use_arch_{name}",
            icon=":material/model_training:",
            on_click=_pick_architecture,
            args=(name,),
            width="stretch",
        )


ref: S.ModelRef = S.get(S.MODEL)
left, right = st.columns([3, 2], gap="large")
with left:
    st.subheader("1 · Model")
    source = st.radio(
        "Which model?",
        ["builtin", "upload"],
        index=0 if ref.kind == "builtin" else 1,
        format_func=lambda k: "Built-in demo (shapes CNN)" if k == "builtin" else "Upload my own",
        horizontal=True,
        key="_w_model_source",
        on_change=_use_builtin,
    )
    if source == "upload":
        st.caption(
            "Weights only (a state_dict saved with `torch.save`, or `.safetensors`) with the "
            "architecture picked below, or a whole model exported with `torch.export` (`.pt2`)."
            + (" Pickled modules are allowed on this server." if pickle_allowed() else "")
        )
        limit_mb = W.upload_limit_mb()
        model_file = st.file_uploader(
            "Model file",
            type=MODEL_TYPES,
            key="_w_model_file",
            max_upload_size=limit_mb,
            help=None
            if limit_mb is None
            else f"Files up to {limit_mb} MB. The operator of this server sets this limit with "
            "the environment variable EXPLAINER_MAX_UPLOAD_MB.",
        )
        if limit_mb is not None:
            st.caption(
                f"Model files up to **{limit_mb} MB** on this server (a full-precision vit_b_16 "
                "is 346 MB). The operator raises the limit with the environment variable "
                "`EXPLAINER_MAX_UPLOAD_MB`, e.g. `EXPLAINER_MAX_UPLOAD_MB=2000 streamlit run "
                "app.py`."
            )
        c1, c2 = st.columns([3, 2])
        arch = c1.selectbox(
            "Architecture (weights-only files)",
            [FROM_FILE, *list_architectures()],
            format_func=lambda a: "Detect from the file" if a == FROM_FILE else a,
            key="_w_arch",
            help="A state_dict or safetensors file holds only numbers: say which network "
            "they belong to.",
        )
        num_classes = c2.number_input(
            "Classes (0 = from the file)",
            min_value=0,
            max_value=100_000,
            value=0,
            key="_w_num_classes",
            help="Number of outputs, if the file does not tell.",
        )
        labels_file = st.file_uploader(
            "Class names (optional: one per line, or a JSON list)",
            type=LABEL_TYPES,
            key="_w_labels_file",
            max_upload_size=W.upload_limit_mb(max_label_bytes),
        )
        picked = st.session_state.pop(S.ARCH_PICK, None)
        if st.button("Load model", type="primary", disabled=model_file is None):
            _load_upload(model_file, arch, num_classes, labels_file)
        elif picked and model_file is not None:
            _load_upload(model_file, picked, num_classes, labels_file)
        _offer_architectures(model_file)

    if ctx.lm is not None:
        lm = ctx.lm
        c, h, w = lm.input_size
        st.markdown(f"**{md(lm.name)}** · architecture {md(lm.arch)} · {md(lm.source_format)}")
        m1, m2, m3 = st.columns(3)
        m1.metric("Parameters", f"{lm.num_params:,}")
        m2.metric("Input (C×H×W)", f"{c}×{h}×{w}")
        m3.metric("Classes", f"{lm.num_classes:,}")
        positions = W.output_positions(lm)
        if positions:
            grid = " × ".join(str(d) for d in positions)
            st.caption(
                f":material/grid_on: This model scores every position of its {grid} output "
                f"(scores shaped {lm.num_classes:,} × {grid} per image, like a segmentation "
                "model). The explanation pages explain one class's score at one output position; "
                "the predictions below give each class's share of the output."
            )
        with st.expander("Model summary", expanded=False):
            ok, summary = W.attempt("Describing the model", describe_model, lm.info)
            if ok and summary:
                table = pd.DataFrame({"": list(summary.keys()), "value": list(summary.values())})
                st.dataframe(table, hide_index=True, width="stretch")
            labels_note = S.get(S.LABELS)
            if labels_note is not None:
                st.caption(f"Class names from {md(labels_note.filename)}.")
        for note in lm.notes:
            st.caption(f":material/info: {md(note)}")


# --- preprocessing ------------------------------------------------------------------------------
def _parse_floats(text: str) -> tuple[float, ...]:
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        return tuple(float(p) for p in parts)
    except ValueError:
        raise ExplainerError(
            f"{text!r} is not a list of numbers; write them like 0.485, 0.456, 0.406."
        ) from None


def _apply_prep(spec: S.PrepSpec) -> bool:
    if ctx.lm is None:
        return False
    ok, _ = W.attempt("Setting up the preprocessing", backend.preprocessing, spec, ctx.lm)
    if ok:
        st.session_state[S.PREP] = spec
    else:
        st.info("The previous preprocessing is still in use.")
    return ok


# One sentence per fit mode, shown under its choice. (Comments, not docstrings: Streamlit would
# draw a bare string on the page.)
FIT_SENTENCES = {
    "crop": "Scale the shorter side to fit and keep the centre: the ends of the longer side are "
    "cut away (the usual evaluation pipeline).",
    "pad": "Keep the whole picture: scale it to fit and fill the rest with the mean colour "
    "(zero after normalising, so the padding adds no signal). The padding is hatched.",
    "resize": "Keep the whole picture but not its shape: stretch it to the input's size.",
}


def _fit_notices(images: list[S.ImageEntry], prep: Preprocessing) -> None:
    """For every image whose shape is not the input's, a small picture of what the fit mode does
    to it and a sentence with the pixels cut or padded. Images of the input's shape get none."""
    shown = []
    for entry in images:
        try:
            layout = backend.image_fit(entry, prep)
        except ExplainerError:
            continue  # the image's card says why it cannot be read
        if not layout.same_shape:
            shown.append((entry, layout))
    if not shown:
        return
    what = {"crop": "what is cut", "pad": "the padding", "resize": "the stretch"}[prep.fit]
    st.markdown(f"**Non-square images**: {what}, image by image.")
    per_row = 4
    for start in range(0, len(shown), per_row):
        cols = st.columns(per_row)
        for col, (entry, layout) in zip(cols, shown[start : start + per_row], strict=False):
            with col:
                ok, preview = W.attempt(
                    f"Drawing the fit of {entry.name}", backend.fit_picture, entry, prep
                )
                if ok:
                    st.image(preview, width="stretch")
                st.caption(
                    f"**{md(entry.name)}** ({layout.width} × {layout.height} px): "
                    f"{layout.caption()}"
                )


def _describe_prep(prep: Preprocessing) -> str:
    return prep.describe()


with right:
    st.subheader("2 · Preprocessing")
    spec: S.PrepSpec = S.get(S.PREP)
    presets = list(S.PREP_PRESETS)
    preset = st.radio(
        "Normalisation",
        presets,
        index=presets.index(spec.preset) if spec.preset in presets else 0,
        format_func=lambda p: S.PREP_PRESETS[p],
        key="_w_prep_preset",
        help="Use what the model was trained with. 'Model default' is read from the model.",
    )
    if preset == "custom":
        c1, c2 = st.columns(2)
        mean_text = c1.text_input(
            "Mean", ", ".join(f"{m:g}" for m in spec.mean), key="_w_prep_mean"
        )
        std_text = c2.text_input("Std", ", ".join(f"{s:g}" for s in spec.std), key="_w_prep_std")
        if st.button("Apply mean / std"):
            ok, values = W.attempt(
                "Reading mean and std",
                lambda: (_parse_floats(mean_text), _parse_floats(std_text)),
            )
            if ok and values is not None:
                if _apply_prep(S.PrepSpec("custom", values[0], values[1], spec.fit)):
                    st.rerun()
    elif preset != spec.preset:
        if _apply_prep(S.PrepSpec(preset, spec.mean, spec.std, spec.fit)):
            st.rerun()
    fits = list(S.FIT_NAMES)
    fit = st.radio(
        "Non-square images",
        fits,
        index=fits.index(spec.fit) if spec.fit in fits else 0,
        format_func=lambda f: S.FIT_NAMES[f],
        captions=[FIT_SENTENCES[f] for f in fits],
        key="_w_prep_fit",
        help="The model takes pictures of one shape; this is how a picture of another shape is "
        "made to fit. Every page explains the input made this way.",
    )
    if fit != spec.fit:
        if _apply_prep(replace(spec, fit=fit)):
            st.rerun()
    if ctx.prep is not None:
        st.caption(_describe_prep(ctx.prep))
        if ctx.prep.fit == "crop" and ctx.prep.resize is None:
            st.caption(
                ":material/info: With this model and preset the picture is resized straight to "
                "the input's size, so a non-square picture is stretched rather than cropped. "
                "Pick **Pad to a square** to keep its shape."
            )


# --- images -------------------------------------------------------------------------------------
def _sample_entries() -> list[S.ImageEntry]:
    return W.load_samples()


def _on_samples_change() -> None:
    chosen = set(st.session_state.get("_w_samples") or [])
    samples = {e.name: e for e in _sample_entries()}
    images = [e for e in S.get(S.IMAGES) if e.source != "sample"]
    picked = [samples[name] for name in samples if name in chosen]
    st.session_state[S.IMAGES] = picked + images


NAMES_SHOWN = 5  # file names a grouped upload message lists before it says "and N more"
# Distinct reasons shown for one upload; files refused for further reasons share one message.
REASONS_SHOWN = 4


def _names_text(names: list[str]) -> str:
    """``a.png, b.png and 3 more``: at most :data:`NAMES_SHOWN` names, escaped for markdown."""
    shown = ", ".join(md(name) for name in names[:NAMES_SHOWN])
    rest = len(names) - NAMES_SHOWN
    return f"{shown} and {rest:,} more" if rest > 0 else shown


def _rejection_messages(rejected: dict[str, list[str]]) -> list[str]:
    """One message per reason (the reason says what to do) naming the files it stopped.

    Damaged files can each fail in their own words; past :data:`REASONS_SHOWN` reasons, the
    remaining files share one message quoting the first of their reasons.
    """
    groups = list(rejected.items())
    if len(groups) > REASONS_SHOWN:
        rest = groups[REASONS_SHOWN - 1 :]
        names = [name for _, group in rest for name in group]
        groups = groups[: REASONS_SHOWN - 1] + [
            (f"{len(rest)} other problems; the first was: {rest[0][0]}", names)
        ]
    messages = []
    for reason, names in groups:
        count = "1 file was" if len(names) == 1 else f"{len(names):,} files were"
        messages.append(f"**{count} not added** ({_names_text(names)}): {reason}")
    return messages


def _on_upload_images() -> None:
    """Add the uploaded images that fit the operator's limits and can be read.

    Files that would go over the number of images, the size of one file or the bytes of all
    images of a session are refused before they are decoded; what the session already holds is
    kept. Refusals are grouped by reason, one message each, however many files there are.
    """
    files = st.session_state.get("_w_image_files") or []
    images = list(S.get(S.IMAGES))
    known = {e.digest for e in images}
    held = sum(len(e.data) for e in images)
    try:
        count_limit, file_limit = max_images(), max_image_bytes()
        session_limit = max_session_image_bytes()
    except ExplainerError as exc:  # a broken server setting: nothing is added, nothing lost
        st.session_state[S.UPLOAD_ERRORS] = [f"**No image was added.** {md(exc)}"]
        return
    too_many = (
        f"this server keeps at most {count_limit} images per session. Remove some images "
        "first, then upload these again."
    )
    too_large = (
        f"each file may be at most {file_limit / 2**20:.3g} MB (EXPLAINER_MAX_IMAGE_MB). Resize "
        "or re-compress these images, then upload them again."
    )
    too_much = (
        f"the images of one session may take at most {session_limit / 2**20:.3g} MB in all "
        "(EXPLAINER_MAX_SESSION_IMAGES_MB). Remove some images first, then upload these again."
    )
    rejected: dict[str, list[str]] = {}
    added = None
    for file in files:
        data = file.getvalue()
        entry = S.ImageEntry.from_bytes(file.name, data, source="upload")
        if entry.digest in known:
            continue
        reason = None
        if len(images) >= count_limit:
            reason = too_many
        elif len(data) > file_limit:
            reason = too_large
        elif held + len(data) > session_limit:
            reason = too_much
        else:
            try:
                backend.validate_image(data)
            except ExplainerError as exc:
                reason = md(exc)
        if reason is not None:
            rejected.setdefault(reason, []).append(file.name)
            continue
        images.append(entry)
        urlstate.keep_upload(data, "image", file.name)  # for links and reloads
        known.add(entry.digest)
        held += len(data)
        added = entry
    st.session_state[S.IMAGES] = images
    st.session_state[S.UPLOAD_ERRORS] = _rejection_messages(rejected)
    if added is not None:
        st.session_state[S.ACTIVE_IMAGE] = added.digest
        if S.get(S.MODEL).kind != "builtin":
            _set_samples_aside()


def _set_active(digest: str) -> None:
    st.session_state[S.ACTIVE_IMAGE] = digest


def _remove(digest: str) -> None:
    gone = [e for e in S.get(S.IMAGES) if e.digest == digest]
    st.session_state[S.IMAGES] = [e for e in S.get(S.IMAGES) if e.digest != digest]
    if gone and gone[0].source == "sample" and "_w_samples" in st.session_state:
        st.session_state["_w_samples"] = [
            n for n in st.session_state["_w_samples"] if n != gone[0].name
        ]


st.subheader("3 · Images")
samples = _sample_entries()
c1, c2 = st.columns(2)
with c1:
    sample_names = [e.name for e in samples]
    current = [e.name for e in ctx.images if e.source == "sample"]
    if "_w_samples" not in st.session_state:
        st.session_state["_w_samples"] = [n for n in current if n in sample_names]
    st.multiselect(
        "Sample images",
        sample_names,
        key="_w_samples",
        on_change=_on_samples_change,
        help="Images drawn by the same generator the demo model was trained on.",
    )
with c2:
    st.file_uploader(
        "Upload images",
        type=IMAGE_TYPES,
        accept_multiple_files=True,
        key="_w_image_files",
        on_change=_on_upload_images,
        help="Any photo or drawing; it is resized to the model's input size.",
    )
for message in S.get(S.UPLOAD_ERRORS) or []:
    st.error(message, icon=":material/broken_image:")

images: list[S.ImageEntry] = list(S.get(S.IMAGES))
if not images:
    st.info("No images yet: pick a sample or upload one.")
elif ctx.lm is not None and ctx.prep is not None:
    _fit_notices(images, ctx.prep)
    active = st.session_state.get(S.ACTIVE_IMAGE)
    per_position = bool(W.output_positions(ctx.lm))
    if per_position:
        st.caption(
            "Bars: the share of the output each class covers (the positions where it has the "
            "highest score)."
        )
    per_row = 3  # four cards per row clip their buttons and bar labels at 1024 px
    shown_errors: set[str] = set()
    for start in range(0, len(images), per_row):
        cols = st.columns(per_row)
        for col, entry in zip(cols, images[start : start + per_row], strict=False):
            with col.container(border=True):
                is_active = entry.digest == active
                st.markdown(
                    f"**{md(entry.name)}**" + (" · :orange-badge[explaining]" if is_active else "")
                )
                ok, pixels = W.attempt(
                    f"Reading {entry.name}", backend.display_image, entry, ctx.prep
                )
                if not ok:
                    continue
                st.image(pixels, width="stretch", clamp=True)
                ok, preds = W.attempt_each(
                    f"Predicting {entry.name}",
                    shown_errors,
                    backend.predictions,
                    ctx.lm,
                    entry,
                    ctx.prep,
                    5,
                )
                if ok and preds:
                    W.plotly_static(
                        F.prediction_bars(
                            preds, hover_suffix=" of the output" if per_position else ""
                        ),
                        key=f"_top_{entry.digest[:16]}",
                    )
                # One above the other: side by side, a narrow card (1024 px) broke the words.
                b1 = b2 = st.container()
                b1.button(
                    "Explain",
                    key=f"_w_explain_{entry.digest[:16]}",
                    on_click=_set_active,
                    args=(entry.digest,),
                    disabled=is_active,
                    type="primary" if not is_active else "secondary",
                    width="stretch",
                )
                b2.button(
                    "Remove",
                    key=f"_w_remove_{entry.digest[:16]}",
                    on_click=_remove,
                    args=(entry.digest,),
                    width="stretch",
                )

W.next_step(W.PAGE_LAYER, "Next: pick a layer to look inside")
