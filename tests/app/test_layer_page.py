"""Layer picker page: the module tree, suggestions, search, and refusing unusable layers."""

from __future__ import annotations

from apphelpers import (
    PAGE_CONDUCTANCE,
    PAGE_LAYER,
    error_text,
    open_page,
    resnet18_state_dict_bytes,
    upload_model,
    widget,
)

from explainer.intake import load_demo_model


def test_tree_shows_every_top_level_module_and_suggestions(app):
    open_page(app, PAGE_LAYER)
    assert app.title[0].value == "Layer picker"
    assert not app.error
    model = load_demo_model().model
    top = [name for name, _ in model.named_children()]
    labels = " ".join(e.label for e in app.expander)
    groups = [n for n in top if list(getattr(model, n).children())]
    assert all(f"**{name}**" in labels for name in groups)
    pills = widget(app, "button_group", "_w_layer_pills")
    assert pills.options and all(o.startswith("★ ") for o in pills.options)
    # The chosen layer's card shows its output shape without the batch dimension.
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Chosen layer"] == app.session_state["layer"]
    assert metrics["Output (C×H×W)"].count("×") == 2


def test_picking_a_layer_by_name_is_shared_with_other_pages(app):
    open_page(app, PAGE_LAYER)
    widget(app, "selectbox", "_w_layer_select").set_value("block2")
    app.run()
    assert not app.exception
    assert app.session_state["layer"] == "block2"
    assert {m.label: m.value for m in app.metric}["Chosen layer"] == "block2"
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error
    assert app.session_state["layer"] == "block2"
    sidebar_text = " ".join(str(m.value) for m in app.sidebar.markdown)
    assert "block2" in sidebar_text


def test_changing_layer_clears_the_neuron_selection(app):
    app.session_state["neuron"] = (1, 2, 3)
    app.session_state["channel"] = 1
    open_page(app, PAGE_LAYER)
    widget(app, "selectbox", "_w_layer_select").set_value("block1")
    app.run()
    assert app.session_state["layer"] == "block1"
    assert app.session_state["neuron"] is None
    assert app.session_state["channel"] is None


def test_search_lists_matching_modules(app):
    open_page(app, PAGE_LAYER)
    widget(app, "text_input", "_w_layer_query").set_value("batchnorm")
    app.run()
    assert not app.exception
    captions = " ".join(str(c.value) for c in app.caption)
    model = load_demo_model().model
    expected = sum(1 for _, m in model.named_modules() if type(m).__name__ == "BatchNorm2d")
    assert f"{expected} module(s) match" in captions
    frame = app.dataframe[0].value
    assert set(frame["type"]) == {"BatchNorm2d"}


def test_unusable_layer_shows_the_reason_and_keeps_the_previous_layer(app):
    # resnet18 calls each block's ReLU twice, so conductance cannot be taken there.
    upload_model(app, resnet18_state_dict_bytes(), "resnet18_weights.pt", "resnet18")
    assert app.session_state["model_ref"].kind == "upload"
    open_page(app, PAGE_LAYER)
    previous = app.session_state["layer"]
    widget(app, "selectbox", "_w_layer_select").set_value("layer1.0.relu")
    app.run()
    assert not app.exception
    message = error_text(app)
    assert "layer1.0.relu" in message
    assert "2 times" in message or "reused" in message
    assert app.session_state["layer"] == previous


def test_unknown_layer_in_state_is_reported_on_the_conductance_page(app):
    app.session_state["layer"] = "no_such_layer"
    open_page(app, PAGE_CONDUCTANCE)
    assert "no_such_layer" in error_text(app)
    assert app.session_state["layer"] == "no_such_layer"
    assert not [m for m in app.metric if m.label == "Sum of conductance"]


def test_depth_control_folds_the_inside_of_blocks(app):
    upload_model(app, resnet18_state_dict_bytes(), "resnet18_weights.pt", "resnet18")
    open_page(app, PAGE_LAYER)
    widget(app, "select_slider", "_w_tree_depth").set_value(2)
    app.run()
    assert not app.exception
    names = {n for frame in app.dataframe for n in frame.value["name"]}
    assert {"layer1", "layer1.0", "layer4.1"} <= names
    assert "layer1.0.conv1" not in names
    widget(app, "select_slider", "_w_tree_depth").set_value(4)
    app.run()
    names = {n for frame in app.dataframe for n in frame.value["name"]}
    assert {"layer1.0.conv1", "layer2.0.downsample.0"} <= names
