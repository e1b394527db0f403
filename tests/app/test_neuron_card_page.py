"""Neuron card page: the neuron's maps and shares, the causal check, the sanity check, the link
to the Dataset page, and a plain message for everything that can go wrong."""

from __future__ import annotations

import numpy as np
import pytest
from apphelpers import (
    PAGE_NEURON_CARD,
    error_text,
    open_page,
    plotly_specs,
    upload_model,
    values,
    visible,
    widget,
)
from downloadhelpers import capture, csv_array, download_keys, npz_arrays, open_menu, row_files
from test_layouts_in_app import SWIN_STAGE, VIT_LAYER, model_bytes, raw_output

from explainer import checks
from explainer.errors import ExplainerError, JobCancelled
from webapp import backend
from webapp import dataset as D
from webapp import neuron_card as N
from webapp import state as S


def texts(at, kind: str) -> str:
    return visible("\n".join(str(e.value) for e in getattr(at, kind)))


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def served(at):
    """The model, image and preprocessing the page used, as the server knows them."""
    lm = backend.resolve_model(at.session_state[S.MODEL])
    active = at.session_state[S.ACTIVE_IMAGE]
    image = next(e for e in at.session_state[S.IMAGES] if e.digest == active)
    return lm, image, backend.preprocessing(at.session_state[S.PREP], lm)


def frame(at, column: str):
    for element in at.dataframe:
        if column in element.value.columns:
            return element.value
    raise AssertionError(f"no table with a {column!r} column")


def button(at, label: str):
    return next(b for b in at.button if b.label == label)


def test_default_neuron_shows_its_maps_shares_and_causal_check(app):
    open_page(app, PAGE_NEURON_CARD)
    assert app.title[0].value == "Neuron card"
    assert not app.error
    neuron = app.session_state[S.NEURON]
    assert neuron is not None and len(neuron) == 3
    assert "No neuron selected yet: showing the most active one" in texts(app, "caption")
    assert set(metrics(app)) == {"Activation", "Conductance", "Channel share", "Channel rank"}
    specs = plotly_specs(app)
    assert {"card_activation", "card_gradient", "card_nc", "card_flip"} <= set(specs)
    table = frame(app, "zeroed")
    assert table["zeroed"].tolist() == [
        "nothing (the model as it is)",
        f"this neuron (channel {neuron[0]} at row {neuron[1]}, column {neuron[2]})",
        f"its whole channel {neuron[0]}",
        "the top 3 channels",
    ]
    # The built-in model's decision on the first sample flips after a few top channels.
    assert "Zeroing the top" in texts(app, "success")


def test_maps_and_numbers_match_the_service(app):
    app.session_state[S.LAYER] = "block3"
    app.session_state[S.NEURON] = (38, 4, 6)
    open_page(app, PAGE_NEURON_CARD)
    assert not app.error
    lm, image, prep = served(app)
    settings = app.session_state[S.SETTINGS]
    nc = backend.neuron_conductance(lm, image, prep, "block3", (38, 4, 6), settings)
    drawn = values(plotly_specs(app)["card_nc"]["data"][1]["z"])
    np.testing.assert_allclose(drawn, nc.attributions.sum(axis=0), rtol=1e-5, atol=1e-7)
    act = backend.activation(lm, image, prep, "block3")
    assert float(metrics(app)["Activation"]) == pytest.approx(float(act[38, 4, 6]), rel=1e-3)
    cond = backend.conductance(lm, image, prep, "block3", settings)
    share = cond.channel_totals[38] / cond.channel_totals.sum()
    assert metrics(app)["Channel share"] == f"{share:.1%}"
    rank = int(np.sum(cond.channel_totals > cond.channel_totals[38])) + 1
    assert metrics(app)["Channel rank"] == f"{rank} of 64"
    # The ablation table's scores are the model's with the units zeroed.
    order = checks.channel_order(cond.channel_totals)
    ablated = backend.ablation(
        lm,
        image,
        prep,
        "block3",
        settings,
        [[(38, 4, 6)], [(38,)], [(int(i),) for i in order[:3]]],
    )
    table = frame(app, "zeroed")
    assert table["target score"].tolist()[1:] == [
        f"{ablated.target_score(i):.4g}" for i in range(3)
    ]


def test_the_top_k_slider_zeroes_that_many_channels(app):
    app.session_state[S.LAYER] = "block3"
    app.session_state[S.NEURON] = (38, 4, 6)
    open_page(app, PAGE_NEURON_CARD)
    widget(app, "slider", "_w_card_k").set_value(7)
    app.run()
    assert not app.exception and not app.error
    assert frame(app, "zeroed")["zeroed"].tolist()[-1] == "the top 7 channels"


def test_number_inputs_choose_the_neuron(app):
    app.session_state[S.LAYER] = "block3"
    app.session_state[S.NEURON] = (38, 4, 6)
    open_page(app, PAGE_NEURON_CARD)
    widget(app, "number_input", "_w_card_n0").set_value(12)
    app.run()
    assert app.session_state[S.NEURON] == (12, 4, 6)
    assert app.session_state[S.CHANNEL] == 12
    assert any("Neuron **(12, 4, 6)**" in str(m.value) for m in app.markdown)


def test_a_linear_layer_has_units_and_no_channel_row(app):
    app.session_state[S.LAYER] = "classifier"
    app.session_state[S.NEURON] = (2,)
    open_page(app, PAGE_NEURON_CARD)
    assert not app.error
    assert "card_strip" in plotly_specs(app)
    assert frame(app, "zeroed")["zeroed"].tolist()[1:] == [
        "this neuron (feature 2)",
        "the top 3 features",
    ]


def test_the_sanity_check_runs_on_request_and_gives_a_verdict(app, monkeypatch):
    app.session_state[S.LAYER] = "block3"
    app.session_state[S.NEURON] = (38, 4, 6)
    jobs = []
    real = backend.run

    def counting(lm, op, args=None, progress=None):
        if op == "randomisation":
            jobs.append(args)
        return real(lm, op, args, progress)

    monkeypatch.setattr(backend, "run", counting)
    open_page(app, PAGE_NEURON_CARD)
    assert "card_randomisation" not in plotly_specs(app) and not jobs
    button(app, "Run the sanity check").click()
    app.run()
    assert not app.exception and not app.error
    assert "card_randomisation" in plotly_specs(app)
    verdict = texts(app, "success") + texts(app, "info") + texts(app, "warning")
    assert "Verdict." in verdict
    table = frame(app, "Spearman ρ")
    assert len(table) >= 2 and table["map"].tolist()[0] == "learned weights"
    assert all(b.label != "Run the sanity check" for b in app.button)
    # Drawn again from the cache: at most the one job (none when an earlier test ran it).
    app.run()
    assert len(jobs) <= 1 and "card_randomisation" in plotly_specs(app)
    assert all(job["n_steps"] <= backend.RANDOMISATION_STEPS for job in jobs)


def test_a_stopped_sanity_check_says_so_and_can_run_again(app, monkeypatch):
    real = backend.run

    def cancelled(lm, op, args=None, progress=None):
        if op == "randomisation":
            raise JobCancelled("The request was cancelled.")
        return real(lm, op, args, progress)

    monkeypatch.setattr(backend, "run", cancelled)
    app.session_state[S.LAYER] = "block2"
    app.session_state[S.NEURON] = (1, 2, 2)
    app.session_state[S.SETTINGS] = S.AttributionSettings(n_steps=13)  # not cached elsewhere
    open_page(app, PAGE_NEURON_CARD)
    button(app, "Run the sanity check").click()
    app.run()
    assert not app.exception and not app.error
    assert "stopped before it finished" in texts(app, "info")
    assert app.session_state[S.CARD_CHECK] is None
    # The Stop button is gone with the computation; Run starts it again.
    assert [b.label for b in app.button if "sanity" in b.label] == ["Run the sanity check"]
    app.run()
    assert "stopped before it finished" in texts(app, "info")
    assert any(b.label == "Run the sanity check" for b in app.button)


def test_a_failing_sanity_check_is_a_plain_message(app, monkeypatch):
    real = backend.run

    def broken(lm, op, args=None, progress=None):
        if op == "randomisation":
            raise ExplainerError("This model cannot be copied.")
        return real(lm, op, args, progress)

    monkeypatch.setattr(backend, "run", broken)
    app.session_state[S.LAYER] = "block2"
    app.session_state[S.NEURON] = (1, 2, 2)
    app.session_state[S.SETTINGS] = S.AttributionSettings(n_steps=15)
    open_page(app, PAGE_NEURON_CARD)
    button(app, "Run the sanity check").click()
    app.run()
    assert not app.exception
    assert "**Running the sanity check failed.** This model cannot be copied." in error_text(app)
    assert any(b.label == "Run the sanity check" for b in app.button)


def test_neuron_outside_the_layer_falls_back_with_a_warning(app):
    app.session_state[S.LAYER] = "block3"
    app.session_state[S.NEURON] = (999, 0, 0)
    open_page(app, PAGE_NEURON_CARD)
    assert "(999, 0, 0)" in texts(app, "warning")
    assert app.session_state[S.NEURON][0] < 64
    assert not app.error


def test_a_layer_without_channels_says_so(app, monkeypatch):
    monkeypatch.setattr(backend, "activation", lambda *args: np.zeros((0,), dtype=np.float32))
    open_page(app, PAGE_NEURON_CARD)
    assert "no channels or units" in texts(app, "warning")
    assert not plotly_specs(app)


def test_no_model_says_where_to_load_one(app, monkeypatch):
    def broken(*args, **kwargs):
        raise ExplainerError("The model file is damaged.")

    monkeypatch.setattr(backend, "resolve_model", broken)
    open_page(app, PAGE_NEURON_CARD)
    assert "No model is ready" in texts(app, "warning")
    assert "The model file is damaged." in error_text(app)
    assert not plotly_specs(app)


def test_no_layer_says_where_to_pick_one(app, monkeypatch):
    monkeypatch.setattr(backend, "default_layer", lambda lm: None)
    app.session_state[S.LAYER] = None
    open_page(app, PAGE_NEURON_CARD)
    assert "No layer is chosen" in texts(app, "warning")
    assert not plotly_specs(app)


def test_an_unknown_layer_is_a_plain_message(app):
    app.session_state[S.LAYER] = "nowhere"
    open_page(app, PAGE_NEURON_CARD)
    assert "no layer named 'nowhere'" in error_text(app)
    assert not plotly_specs(app)


def test_the_dataset_link_opens_the_dataset_page_on_the_same_channel(app):
    app.session_state[S.LAYER] = "block3"
    app.session_state[S.NEURON] = (38, 4, 6)
    open_page(app, PAGE_NEURON_CARD)
    button(app, "See channel 38 on the Dataset page").click()
    app.run()
    assert not app.exception
    assert app.title[0].value == "Dataset"
    assert app.session_state[D.FOCUS] == ("block3", 38)  # kept until a store is shown


@pytest.fixture(scope="module")
def store_folder(tmp_path_factory):
    """A dataset folder with one small store of the built-in model's block3."""
    from test_dataset_page import InProcessExecutor, build_dataset

    from explainer.batch.runner import BatchSettings, run_batch
    from explainer.compute import ModelSource

    base = tmp_path_factory.mktemp("card-dataset")
    runs = base / "runs"
    runs.mkdir()
    run_batch(
        ModelSource("builtin"),
        build_dataset(base / "images"),
        runs / "shapes.sqlite",
        BatchSettings(layers=("block3",), n_steps=4, labels_from_folders=True),
        InProcessExecutor(),
    )
    return runs


@pytest.mark.parametrize("layer, shown", [("block3", True), ("block2", False)])
def test_the_dataset_page_opens_on_the_cards_channel(app, monkeypatch, store_folder, layer, shown):
    monkeypatch.setenv("EXPLAINER_DATASET_DIR", str(store_folder))
    app.session_state[S.LAYER] = layer
    app.session_state[S.NEURON] = (5, 1, 1)
    open_page(app, PAGE_NEURON_CARD)
    button(app, "See channel 5 on the Dataset page").click()
    app.run()
    assert not app.exception and app.title[0].value == "Dataset"
    note = texts(app, "info")
    assert D.FOCUS not in app.session_state  # taken once
    if shown:
        assert "Opened from the neuron card on layer **block3**, channel **5**" in note
        assert widget(app, "number_input", "_w_ds_channel").value == 5
        assert app.session_state[D.NEURON] == ("block3", 5)
    else:
        assert "no results for layer **block2**" in note and "--layers block2" in note


# --- downloads ----------------------------------------------------------------------------------
def _stem(files: dict) -> str:
    (npz,) = [name for name in files if name.endswith(".npz")]
    return npz[: -len(".npz")]


def test_the_maps_the_causal_check_and_the_sanity_check_download_as_shown(app, monkeypatch):
    offered = capture(monkeypatch)
    app.session_state[S.LAYER] = "block3"
    app.session_state[S.NEURON] = (38, 4, 6)
    open_page(app, PAGE_NEURON_CARD)
    open_menu(app, "card")
    open_menu(app, "card_causal")
    assert not app.error, error_text(app)
    specs = plotly_specs(app)

    maps = row_files(offered, "neuron_card_block3_")
    stem = _stem(maps)
    for name in ("activation_map", "neuron_gradient", "neuron_conductance"):
        assert {f"{stem}_{name}.png", f"{stem}_{name}.svg"} <= set(maps), sorted(maps)
        assert f"card_dl_{name}_png" in download_keys(app)
    activation = csv_array(maps, f"{stem}_activation.csv")
    assert activation.shape == (64, 8, 8)
    drawn = np.asarray(values(specs["card_activation"]["data"][0]["z"]), dtype=np.float64)
    np.testing.assert_allclose(activation[38], drawn, rtol=1e-6)
    arrays = npz_arrays(maps, f"{stem}.npz")
    drawn_nc = values(specs["card_nc"]["data"][1]["z"])
    np.testing.assert_allclose(arrays["neuron_conductance"].sum(axis=0), drawn_nc, rtol=1e-5)
    assert arrays["neuron_gradient"].shape == (3, *arrays["image"].shape[:2])

    causal = row_files(offered, "causal_check_block3_")
    stem = _stem(causal)
    assert {f"{stem}_flip_search.png", f"{stem}_causal_target_score.csv"} <= set(causal)
    scores = csv_array(causal, f"{stem}_causal_target_score.csv")
    table = frame(app, "zeroed")
    assert [f"{s:.4g}" for s in scores] == table["target score"].tolist()
    arrays = npz_arrays(causal, f"{stem}.npz")
    np.testing.assert_array_equal(arrays["top_channels"].shape, (3,))
    np.testing.assert_allclose(
        arrays["flip_target_score"], values(specs["card_flip"]["data"][0]["y"]), rtol=1e-12
    )


def test_the_sanity_check_downloads_its_maps_and_scores(app, monkeypatch):
    offered = capture(monkeypatch)
    app.session_state[S.LAYER] = "block3"
    app.session_state[S.NEURON] = (38, 4, 6)
    open_page(app, PAGE_NEURON_CARD)
    # An earlier test in this process may have left this check in the server's cache: then the
    # page shows it at once, without the Run button.
    run = [b for b in app.button if b.label == "Run the sanity check"]
    if run:
        run[0].click()
        app.run()
    assert not app.error, error_text(app)
    assert "card_randomisation" in plotly_specs(app)
    open_menu(app, "card_sanity")
    files = row_files(offered, "sanity_check_block3_")
    stem = _stem(files)
    assert {f"{stem}_randomisation.png", f"{stem}_spearman.csv", f"{stem}_ssim.csv"} <= set(files)
    lm, image, prep = served(app)
    done = backend.randomisation_cached(
        lm, image, prep, "block3", (38, 4, 6), app.session_state[S.SETTINGS]
    )
    assert done is not None
    arrays = npz_arrays(files, f"{stem}.npz")
    np.testing.assert_allclose(arrays["randomisation_maps"], done.maps, rtol=1e-12)
    np.testing.assert_allclose(
        csv_array(files, f"{stem}_spearman.csv"), done.spearman, rtol=1e-12, equal_nan=True
    )
    table = frame(app, "Spearman ρ")
    assert table["Spearman ρ"].tolist()[1:] == [N.number(v) for v in done.spearman]


# --- a vision transformer: the card speaks in features and patches ------------------------------
def test_a_vision_transformer_neuron_is_shown_in_feature_and_patch_terms(app, monkeypatch):
    offered = capture(monkeypatch)
    upload_model(app, model_bytes("vit"), "vit.pt2", arch="resnet18")
    assert not app.error, error_text(app)
    app.session_state[S.LAYER] = VIT_LAYER
    app.session_state[S.NEURON] = (5, 2, 3)
    open_page(app, PAGE_NEURON_CARD)
    assert not app.error, error_text(app)
    raw = raw_output(app, "vit", VIT_LAYER)  # (17 tokens, 16 features)
    heading = texts(app, "markdown")
    assert "Neuron **(5, 2, 3)** (feature 5 at patch row 2, column 3)" in heading
    assert "raw index (12, 5)" in heading  # token 1 + 2 * 4 + 3
    assert float(metrics(app)["Activation"]) == pytest.approx(raw[12, 5], rel=1e-3, abs=1e-4)
    assert {"Feature share", "Feature rank"} <= set(metrics(app))
    labels = [n.label for n in app.number_input if n.key.startswith("_w_card_n")]
    assert labels == ["feature", "patch row", "patch column"]
    assert widget(app, "toggle", "_w_card_cls").value is False
    # Feature 5 over the 4x4 patch grid, not a token's row of features.
    grid = np.asarray(values(plotly_specs(app)["card_activation"]["data"][0]["z"]))
    np.testing.assert_allclose(grid, raw[1:, 5].reshape(4, 4), rtol=1e-3, atol=1e-4)
    assert "Activation of feature 5" in heading
    table = frame(app, "zeroed")
    assert table["zeroed"].tolist() == [
        "nothing (the model as it is)",
        "this neuron (feature 5 at patch row 2, column 3)",
        "its whole feature 5",
        "the top 3 features",
    ]
    # Zeroing feature 5 zeroes it in every token (an independent forward pass with a hook).
    before = float(table["target score"].tolist()[0])
    whole = float(table["target score"].tolist()[2])
    plain, zeroed = _scores_with_feature_zeroed(app, 5)
    target = int(np.argmin(np.abs(plain - before)))
    assert zeroed[target] == pytest.approx(whole, rel=1e-3, abs=1e-3)
    # The flip search runs on features: ranked by the features' conductance, each zeroed in
    # every token, as a plain forward pass with a hook finds.
    assert "card_flip" in plotly_specs(app)
    assert "zeroes whole slices" not in texts(app, "caption")
    assert "A feature is zeroed in every token" in texts(app, "caption")
    _check_flip_against_torch(app, "vit", VIT_LAYER, "feature", "class_patch_tokens")
    # The downloads and the report view are in the same terms.
    open_menu(app, "card")
    files = row_files(offered, "neuron_card_")
    arrays = npz_arrays(files, _stem(files) + ".npz")
    np.testing.assert_allclose(
        arrays["activation"], raw[1:].T.reshape(16, 4, 4), rtol=1e-3, atol=1e-4
    )
    np.testing.assert_allclose(arrays["class_token_activation"], raw[0], rtol=1e-3, atol=1e-4)
    next(b for b in app.button if b.key == "card_add_report").click()
    app.run()
    (view,) = app.session_state[S.REPORT_VIEWS]
    assert view.neuron == (5, 2, 3)
    assert ("Neuron", "feature 5 at patch row 2, column 3") in view.summary
    assert "feature 5 at patch row 2, column 3" in view.title

    # The class token: its own neuron, drawn as a strip of its features.
    app.session_state[S.NEURON] = (5,)
    app.run()
    assert not app.error, error_text(app)
    assert "Neuron **(5,)** (feature 5 of the class token)" in texts(app, "markdown")
    assert float(metrics(app)["Activation"]) == pytest.approx(raw[0, 5], rel=1e-3, abs=1e-4)
    assert "card_strip" in plotly_specs(app) and "card_activation" not in plotly_specs(app)
    assert widget(app, "toggle", "_w_card_cls").value is True
    zeroed_first = frame(app, "zeroed")["zeroed"].tolist()[1]
    assert zeroed_first == "this neuron (feature 5 of the class token)"


def test_the_flip_search_zeroes_whole_channels_of_a_channels_last_map(app):
    upload_model(app, model_bytes("swin"), "swin.pt2", arch="resnet18")
    assert not app.error, error_text(app)
    app.session_state[S.LAYER] = SWIN_STAGE  # (4, 4, 16): channels last
    app.session_state[S.NEURON] = (9, 1, 2)
    open_page(app, PAGE_NEURON_CARD)
    assert not app.error and not app.exception, error_text(app)
    assert "card_flip" in plotly_specs(app)
    assert "A channel is zeroed at every position of the map" in texts(app, "caption")
    flip = _check_flip_against_torch(app, "swin", SWIN_STAGE, "channel", "channels_last")
    assert flip.channels == 16  # the channels, not the 4 rows


def _check_flip_against_torch(app, kind: str, layer: str, word: str, layout_kind: str):
    """The card's flip search on a layer whose channels are its last dimension: the ranking
    is the layout view's per-channel conductance (what the card's metrics use), and the scores
    at several k are those of a plain forward pass with the top k channels set to 0 at every
    position (every token)."""
    from explainer.layout import layout_for

    lm, image, prep = served(app)
    settings = app.session_state[S.SETTINGS]
    cond = backend.conductance(lm, image, prep, layer, settings)
    layout = layout_for(cond.attributions.shape, lm.input_size[1:], layout_kind)
    assert layout.kind == layout_kind
    flip = backend.flip_search(lm, image, prep, layer, settings, channel_axis=layout.channel_axis)
    channels = layout.num_channels
    assert (flip.channels, flip.channel_axis) == (channels, len(layout.shape) - 1)
    totals = layout.view(cond.attributions).channel_totals
    np.testing.assert_array_equal(flip.order, checks.channel_order(totals)[: flip.searched])
    drawn = values(plotly_specs(app)["card_flip"]["data"][0]["y"])
    np.testing.assert_allclose(drawn, flip.target_scores, rtol=1e-12)
    top = ", ".join(str(int(c)) for c in flip.order[:3])
    assert f"Top {word}s: {top}" in texts(app, "caption") or flip.searched < 3
    if flip.flipped_at is not None:
        assert f"Zeroing the top **{flip.flipped_at}** {word}" in texts(app, "success")
    else:
        assert f"up to all {flip.searched} of {channels}" in texts(app, "info")
    target = int(flip.target)
    for k in sorted({1, flip.searched // 2, flip.searched}):
        _, zeroed = _scores_with_feature_zeroed(
            app, [int(c) for c in flip.order[:k]], kind=kind, layer=layer
        )
        assert zeroed[target] == pytest.approx(flip.target_scores[k], rel=1e-3, abs=1e-3)
        assert int(np.argmax(zeroed)) == int(flip.predicted[k])
    return flip


def _scores_with_feature_zeroed(
    app, feature: int | list[int], kind: str = "vit", layer: str = VIT_LAYER
) -> tuple[np.ndarray, np.ndarray]:
    """The model's scores for the active image, as they are and with ``feature`` (one or
    several) of the layer's output set to 0 in every token or position (the output's last
    dimension), computed here with plain torch."""
    import torch

    from explainer.images import Preprocessing, load_image, preprocess
    from explainer.intake import load_model

    lm = load_model(model_bytes(kind), filename="m.pt2")
    prep = Preprocessing.for_model(lm.input_size, lm.mean, lm.std)
    active = app.session_state[S.ACTIVE_IMAGE]
    entry = next(e for e in app.session_state[S.IMAGES] if e.digest == active)
    x = preprocess(load_image(entry.data), prep)

    def zero(module, args, out):
        out = out.clone()
        out[..., feature] = 0
        return out

    with torch.no_grad():
        plain = lm.model(x)[0].double().numpy()
        handle = lm.model.get_submodule(layer).register_forward_hook(zero)
        try:
            zeroed = lm.model(x)[0].double().numpy()
        finally:
            handle.remove()
    return plain, zeroed
