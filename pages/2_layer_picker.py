"""Layer picker: the model's module tree, with shapes, sizes and the layers worth a look."""

from __future__ import annotations

import pandas as pd
import streamlit as st

import webapp
from explainer.tree import ModuleNode, ModuleTree
from webapp import backend
from webapp import layouts as L
from webapp import state as S
from webapp import widgets as W
from webapp.text import md

ctx = webapp.setup()
W.page_header(
    "Layer picker",
    "Every module of the network, in the order it is defined, with the shape of what it outputs "
    "for one image and how many parameters it holds. Conductance is measured at a layer's "
    "output: early layers see edges and colours, late layers see parts and whole objects. "
    "Layers marked ★ are good starting points (one per resolution, plus the last one before "
    "the classifier).",
)


def shape_text(node: ModuleNode) -> str:
    """``64×8×8`` (batch dimension dropped); several outputs joined with ``;``."""
    if not node.output_shapes:
        return "—"
    return "; ".join(
        "×".join(str(d) for d in shape[1:]) or "scalar" for shape in node.output_shapes
    )


def status_text(node: ModuleNode, suggested: set[str]) -> str:
    if not node.usable:
        return f"✗ {node.reason}"
    return "★ suggested" if node.name in suggested else "✓ usable"


def choose_layer(tree: ModuleTree, name: str) -> None:
    """Use ``name`` if conductance can be computed there; otherwise explain why not."""
    node = tree.nodes.get(name)
    if node is None:
        st.session_state[S.LAYER_ERROR] = f"The model has no layer named {md(repr(name))}."
        return
    if not node.usable:
        st.session_state[S.LAYER_ERROR] = (
            f"Layer **{md(name)}** ({md(node.type)}) cannot be explained: {md(node.reason)} "
            "Pick another layer; the ★ layers always work."
        )
        return
    st.session_state[S.LAYER_ERROR] = None
    S.set_layer(name)


def on_table_select(tree: ModuleTree, key: str, names: list[str]) -> None:
    event = st.session_state.get(key)
    try:
        rows = event["selection"]["rows"]
    except (KeyError, TypeError):
        return
    if rows:
        choose_layer(tree, names[rows[0]])


def on_select_box(tree: ModuleTree) -> None:
    name = st.session_state.get("_w_layer_select")
    if name is not None:
        choose_layer(tree, name)


def on_pill(tree: ModuleTree) -> None:
    name = st.session_state.get("_w_layer_pills")
    if name:
        choose_layer(tree, name)


def node_table(tree: ModuleTree, names: list[str], key: str, base_depth: int) -> None:
    """One selectable table of modules; clicking a row picks that layer."""
    suggested = set(tree.suggested)
    rows = []
    for name in names:
        node = tree.nodes[name]
        indent = "\u2003" * max(0, node.depth - base_depth) if base_depth >= 0 else ""
        short = name.rsplit(".", 1)[-1] if base_depth >= 0 and node.depth > 1 else name
        rows.append(
            {
                "layer": f"{indent}{short}",
                "name": name,
                "type": node.type,
                "output": shape_text(node),
                "params": node.num_params,
                "status": status_text(node, suggested),
            }
        )
    frame = pd.DataFrame(rows)
    st.dataframe(
        frame,
        hide_index=True,
        width="stretch",
        key=key,
        on_select=lambda: on_table_select(tree, key, names),
        selection_mode="single-row",
        column_config={
            "layer": st.column_config.TextColumn("layer", width="medium"),
            "name": st.column_config.TextColumn("full name", width="medium"),
            "params": st.column_config.NumberColumn("params", format="localized"),
            "status": st.column_config.TextColumn("status", width="large"),
        },
        height=min(35 * (len(rows) + 1) + 12, 470),
    )


if ctx.lm is None:
    W.require_ready(ctx)
    st.stop()

ok, tree = W.attempt("Discovering the layers", backend.tree, ctx.lm)
if not ok or tree is None:
    st.stop()

error = st.session_state.get(S.LAYER_ERROR)
if error:
    st.error(error, icon=":material/block:")
    st.session_state[S.LAYER_ERROR] = None

# --- the chosen layer ---------------------------------------------------------------------------
layer = S.get(S.LAYER)
with st.container(border=True):
    if layer and layer in tree.nodes:
        node = tree.nodes[layer]
        c1, c2, c3, c4 = st.columns([3, 2, 2, 2])
        c1.metric("Chosen layer", md(layer))
        c2.metric("Type", md(node.type))
        one = node.usable and len(node.output_shapes) == 1
        layout = L.layer_layout(ctx.lm, layer, node.output_shapes[0][1:]) if one else None
        c3.metric(
            f"Output ({layout.dims})" if layout is not None and layout.dims else "Output",
            shape_text(node),
            help="The shape of its output for one image.",
        )
        c4.metric("Parameters", f"{node.num_params:,}")
        if one:
            L.layout_choice(ctx.lm, layer, node.output_shapes[0][1:], "picker")
    else:
        st.markdown("No layer chosen yet.")

    names = list(tree.nodes)
    bind_value = layer if layer in tree.nodes else None
    suggested = set(tree.suggested)
    W.bind("_w_layer_select", bind_value)
    st.selectbox(
        "Pick by name (type to search)",
        [n for n in names if n],
        placeholder="Choose a layer",
        format_func=lambda n: (
            f"{n}  ·  {tree.nodes[n].type}"
            + ("  ★" if n in suggested else "")
            + ("" if tree.nodes[n].usable else "  ✗ not usable")
        ),
        key="_w_layer_select",
        on_change=on_select_box,
        args=(tree,),
    )
    if tree.suggested:
        W.bind("_w_layer_pills", layer if layer in suggested else None)
        st.pills(
            "Suggested layers",
            tree.suggested,
            selection_mode="single",
            key="_w_layer_pills",
            on_change=on_pill,
            args=(tree,),
            format_func=lambda n: f"★ {md(n)}",
        )

# --- the tree -----------------------------------------------------------------------------------
st.subheader("Module tree")
query = st.text_input(
    "Search by name or type",
    key="_w_layer_query",
    placeholder="e.g. conv, layer3, BatchNorm",
)
if query.strip():
    hits = [n for n in tree.search(query) if n]
    st.caption(f"{len(hits)} module(s) match {md(repr(query.strip()))}. Click a row to choose it.")
    if hits:
        node_table(tree, hits, "_w_tree_search", base_depth=-1)
else:
    st.caption(
        "Click a row to choose that layer. Containers (blocks, stages) can be chosen too: their "
        "output is the output of their last step."
    )
    max_depth = max(n.depth for n in tree.nodes.values())
    depth = max_depth
    if max_depth > 2:
        depth = st.select_slider(
            "Levels shown inside each block",
            options=list(range(2, max_depth + 1)),
            value=min(3, max_depth),
            key="_w_tree_depth",
            help="Deeper levels show the layers inside blocks (e.g. the convolutions of a "
            "residual block). Search finds modules at any depth.",
        )
    top = tree.root.children
    leaves = [n for n in top if not tree.nodes[n].children]
    groups = [n for n in top if tree.nodes[n].children]
    for name in groups:
        node = tree.nodes[name]
        subtree = [n for n in tree.nodes if n == name or n.startswith(name + ".")]
        descendants = [n for n in subtree if tree.nodes[n].depth <= depth or n == layer]
        star = " ★" if any(n in suggested for n in subtree) else ""
        here = " ← chosen" if layer in subtree else ""
        with st.expander(
            f"**{md(name)}** · {md(node.type)} · {shape_text(node)} · "
            f"{node.num_params:,} params{star}{here}",
            expanded=bool(here),
        ):
            node_table(tree, descendants, f"_w_tree_{name}", base_depth=node.depth)
    if leaves:
        with st.expander("Top-level layers", expanded=True):
            node_table(tree, leaves, "_w_tree_top", base_depth=1)

W.next_step(
    W.PAGE_CONDUCTANCE,
    "Next: see which channels of this layer matter",
    previous=(W.PAGE_MODEL, "Model & images"),
)
