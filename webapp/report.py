"""The review report: views collected from the pages, written out as one HTML file and a PDF.

A :class:`ReportView` is a plain snapshot of what a page showed: the model card and digest, the
image and prediction, the layer, every setting, the convergence verdict, the arrays behind the
maps, and the figures as plotly JSON. It holds no model, no result object and no widget, so a
report can be built at any time later, and a failed export never touches the collected views.

The HTML report is self-contained: the image and the figure data are inline, and the plotly.js
that ships inside the installed ``plotly`` package is inlined once, so the figures stay
interactive, and the file opens offline in any browser without a single outside request (a
Content-Security-Policy in the file forbids any). Every text that came from the user (file
names, class names, layer names, titles, notes) is escaped. The PDF is that HTML printed by
Chromium (:mod:`webapp.export`).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html as _html
import importlib.metadata
import io
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from explainer.errors import ExplainerError
from explainer.images import resize_map
from webapp import export
from webapp import figures as F

DISTRIBUTION = "layer-explainer"
"""The distribution name in ``pyproject.toml``; the app's version is read from its metadata."""
MAX_VIEWS = 24
"""Most views one report collects."""
MAX_REPORT_BYTES = 160 * 1024 * 1024
"""Most bytes of arrays and figure data all collected views may hold together."""
TOP_BARS = 20
GRID_TILES = 36

KINDS = {
    "conductance": "Layer conductance",
    "neuron": "Neuron gradient",
    "convergence": "Convergence",
    "neuron_card": "Neuron card",
    "causal_check": "Causal check",
    "sanity_check": "Sanity check",
    "overview": "Layer overview",
    "compare": "Comparison",
    "dataset": "Dataset",
}

EXPLANATIONS = {
    "conductance": (
        "Layer conductance splits the model's score for the target class, F(image) − "
        "F(baseline), among the units of one layer. Red units push the score up, blue units "
        "push it down; all of them together add up to the score difference. The bars rank the "
        "channels by their total conductance, the tiles show where in the image each channel's "
        "conductance sits, and the overlay sums every channel over the image."
    ),
    "neuron": (
        "One neuron is one number in the layer's output (a channel at one position). Its "
        "gradient with respect to the input image shows which pixels would raise it (red) or "
        "lower it (blue) if nudged: what the neuron is looking at."
    ),
    "convergence": (
        "Conductance is an integral approximated with a finite number of steps. The delta is "
        "how far the sum of conductance misses F(image) − F(baseline). The plot shows how the "
        "delta shrinks as the number of steps grows; where a line falls below the dashed "
        "tolerance, that many steps are enough."
    ),
    "neuron_card": (
        "One neuron of the layer in detail: its activation over the image, its input gradient "
        "(which pixels would raise or lower it), and its neuron conductance (which pixels' "
        "effect on the target flows through it)."
    ),
    "causal_check": (
        "Conductance says how much flows through a unit; zeroing the unit shows whether the "
        "model needs it. The neuron, its whole channel and the top channels by conductance are "
        "set to 0 in turn, and the model's new prediction and target score are recorded."
    ),
    "sanity_check": (
        "The cascading randomisation test: the model's layers are re-initialised from the "
        "output down, the neuron's conductance map is computed again after each step and "
        "compared with the original by Spearman rank correlation and SSIM (1 means identical, "
        "0 unrelated). A map that does not change shows the image rather than the model."
    ),
    "overview": (
        "Every layer of the model in network order: the share of F(image) − F(baseline) that "
        "the layer's conductance adds up to (about 100% where completeness holds), the relative "
        "delta, and how much of the layer's conductance its strongest channels hold."
    ),
    "compare": (
        "The same conductance map side by side for several images, layers, targets, "
        "baselines, or the model against a randomised copy. Panes that explain the same score "
        "can share one colour scale."
    ),
    "dataset": (
        "The mean conductance of each channel over the images of each class in a dataset run: "
        "red channels push the class's score up on average, blue ones push it down."
    ),
}


class ReportError(ExplainerError):
    """A view cannot be collected or a report cannot be built."""


# --- the snapshot -------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FigureSnapshot:
    """One figure of a view: a file-safe name, a title, a caption, and the plotly JSON."""

    name: str
    title: str
    caption: str
    spec: str


@dataclass(frozen=True, eq=False)
class Verdict:
    """The convergence check of one conductance computation against the tolerance."""

    delta: float
    output_diff: float
    relative_delta: float
    tolerance: float
    lines: tuple[str, ...] = ()
    """Extra findings, e.g. how many steps each integration method needs."""

    @property
    def passed(self) -> bool:
        return bool(self.relative_delta <= self.tolerance)


@dataclass(frozen=True, eq=False)
class ReportView:
    """Everything one view of a page showed, as plain data (see the module docstring).

    ``arrays`` holds the numbers behind the figures, with their dimension names in ``dims``;
    ``figures`` is filled by :func:`freeze` when the view is collected (pages build views on
    every run, so the figures are only drawn when they are needed).
    """

    kind: str
    title: str
    created: str
    model: tuple[tuple[str, str], ...]
    model_digest: str
    image_name: str
    image_digest: str
    prediction: tuple[tuple[str, int, float], ...]
    prediction_is_coverage: bool
    layer: str
    target: str
    settings: tuple[tuple[str, str], ...]
    summary: tuple[tuple[str, str], ...] = ()
    verdict: Verdict | None = None
    channel: int | None = None
    neuron: tuple[int, ...] | None = None
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    dims: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    figures: tuple[FigureSnapshot, ...] = ()
    notes: str = ""

    @property
    def nbytes(self) -> int:
        """Bytes of arrays and figure data the view holds."""
        arrays = sum(int(np.asarray(a).nbytes) for a in self.arrays.values())
        return arrays + sum(len(f.spec) for f in self.figures)


def now() -> str:
    """The current UTC time as ``2026-01-31 12:00 UTC``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def app_version() -> str:
    """The installed app's version, from the package metadata."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (the package is not installed)"


def model_card(info: Any) -> tuple[tuple[str, str], ...]:
    """The model's description as (field, value) rows; ``info`` is a ``ModelInfo``."""
    c, h, w = info.input_size
    labels = list(info.labels)
    shown = ", ".join(labels[:12]) + (f", … ({len(labels)} in all)" if len(labels) > 12 else "")
    rows = [
        ("Name", str(info.name)),
        ("Architecture", str(info.arch)),
        ("Format", str(info.source_format)),
        ("Parameters", f"{int(info.num_params):,}"),
        ("Input", f"{c} × {h} × {w} (channels × height × width)"),
        ("Normalisation", f"mean {_floats(info.mean)}, std {_floats(info.std)}"),
        ("Classes", shown),
    ]
    if getattr(info, "output_shape", None):
        rows.append(("Output", " × ".join(str(s) for s in info.output_shape)))
    for note in getattr(info, "notes", ()) or ():
        rows.append(("Note", str(note)))
    return tuple(rows)


def _floats(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def settings_rows(settings: Any, names: Mapping[str, Mapping[str, str]]) -> list[tuple[str, str]]:
    """The attribution settings as (setting, value) rows, in words."""
    methods = names.get("methods", {})
    baselines = names.get("baselines", {})
    rows = [
        ("Baseline", baselines.get(settings.baseline, settings.baseline)),
        ("Integration method", f"{methods.get(settings.method, settings.method)}"),
        ("n_steps", str(settings.n_steps)),
        (
            "Batch size (path points per pass)",
            "automatic" if not settings.internal_batch_size else str(settings.internal_batch_size),
        ),
    ]
    if getattr(settings, "tolerance", None) is not None:
        rows.append(
            ("Steps chosen by the engine", f"until the delta is within {settings.tolerance:.3%}")
        )
    if settings.baseline == "constant":
        rows.append(("Constant grey level", f"{settings.constant:g}"))
    if settings.baseline == "blur":
        rows.append(("Blur sigma (pixels)", f"{settings.blur_sigma:g}"))
    if settings.baseline == "noise":
        rows.append(("Noise seed", str(settings.noise_seed)))
    return rows


def readonly(array: Any) -> np.ndarray:
    """A private, read-only copy of an array (a view never shares memory with a cache)."""
    copy = np.array(array, copy=True)
    copy.setflags(write=False)
    return copy


# --- figures from a view ------------------------------------------------------------------------
Drawing = tuple[str, str, str, Callable[[], go.Figure]]
"""(name, title, caption, draw): a figure of a view, drawn only when ``draw`` is called."""


def _figures_conductance(view: ReportView) -> list[Drawing]:
    attr = view.arrays["attributions"]
    totals = np.asarray(view.arrays["channel_totals"], dtype=np.float64)
    pixels = view.arrays.get("image")
    ranked = F.rank_channels(totals, "abs")
    if attr.ndim != 3:
        unit = view.neuron[0] if view.neuron else None
        return [
            (
                "unit_conductance",
                "Conductance per unit",
                "Each bar is one unit of the layer (the layer has no spatial layout).",
                lambda: F.feature_strip(totals, selected=unit, yaxis_title="conductance"),
            )
        ]
    channel = view.channel if view.channel is not None else (ranked[0] if ranked else 0)
    top, tiles = ranked[:TOP_BARS], ranked[:GRID_TILES]
    out: list[Drawing] = [
        (
            "channel_totals",
            "Total conductance per channel",
            f"The {len(top)} channels with the largest |total conductance|, of {totals.size}.",
            lambda: F.channel_bars(top, totals, selected=channel, height=420),
        ),
        (
            "channel_maps",
            "Channel maps (one shared colour scale)",
            f"Where in the image the conductance of the {len(tiles)} strongest channels sits.",
            lambda: F.channel_grid(
                attr, tiles, totals, zmax=F.symmetric_limit(attr), selected=channel, ncols=6
            ),
        ),
    ]
    spatial = view.arrays.get("spatial")
    if spatial is not None and pixels is not None:

        def overlay() -> go.Figure:
            up = resize_map(np.array(spatial), F.overlay_size(pixels.shape[:2]))
            return F.overlay_map(
                pixels, up, spatial.shape, channel=channel, layer_values=np.asarray(spatial)
            )

        out.append(
            (
                "all_channels_overlay",
                "All channels summed, over the image",
                "The conductance of every channel added up and upsampled over the image.",
                overlay,
            )
        )
    neuron = view.neuron
    cell = (neuron[1], neuron[2]) if neuron is not None and len(neuron) == 3 else None
    out.append(
        (
            "channel_map",
            f"Channel {channel} at the layer's resolution",
            "The selected channel's conductance, one cell per position of the layer.",
            lambda: F.spatial_map(
                attr[channel],
                channel=channel,
                selected_cell=cell if neuron and neuron[0] == channel else None,
                zmax=F.symmetric_limit(attr),
            ),
        )
    )
    return out + _gradient_figures(view)


def _gradient_figures(view: ReportView) -> list[Drawing]:
    raw = view.arrays.get("neuron_gradient")
    pixels = view.arrays.get("image")
    if raw is None or pixels is None or view.neuron is None:
        return []
    grad = np.asarray(raw, dtype=np.float64)
    who = f"neuron {tuple(view.neuron)}"
    return [
        (
            "neuron_gradient",
            f"Signed input gradient of {who}",
            "Pixels that would raise (red) or lower (blue) the neuron if nudged, summed over "
            "the colour channels.",
            lambda: F.gradient_overlay(pixels, grad.sum(axis=0), signed=True, height=380),
        ),
        (
            "neuron_gradient_abs",
            f"|Input gradient| of {who}",
            "The largest |gradient| over the colour channels: the neuron's effective receptive "
            "field.",
            lambda: F.gradient_overlay(pixels, np.abs(grad).max(axis=0), signed=False, height=380),
        ),
    ]


def _figures_neuron(view: ReportView) -> list[Drawing]:
    act = view.arrays.get("activation")
    neuron = view.neuron
    out: list[Drawing] = []
    if act is not None and neuron is not None and act.ndim == 3 and len(neuron) == 3:
        c, y, x = neuron
        out.append(
            (
                "activation_map",
                f"Activation of channel {c}",
                f"The layer's output in channel {c}; the selected neuron is at ({y}, {x}).",
                lambda: F.spatial_map(
                    act[c],
                    channel=c,
                    selected_cell=(y, x),
                    colorbar_title="activation",
                    height=380,
                ),
            )
        )
    elif act is not None and neuron is not None and act.ndim == 1:
        out.append(
            (
                "activation",
                "Activation of every unit",
                "The layer's output, one bar per unit.",
                lambda: F.feature_strip(act, selected=neuron[0], yaxis_title="activation"),
            )
        )
    return out + _gradient_figures(view)


def _figures_convergence(view: ReportView) -> list[Drawing]:
    steps = view.arrays.get("sweep_n_steps")
    if steps is None or steps.size == 0:
        return []
    methods = list(view.extra.get("methods", ()))
    index = view.arrays["sweep_method"]
    rel = view.arrays["sweep_relative_delta"]
    names = dict(view.extra.get("method_names", {}))
    points = [
        (methods[int(i)], int(n), float(r)) for i, n, r in zip(index, steps, rel, strict=True)
    ]
    tolerance = view.verdict.tolerance if view.verdict is not None else None
    return [
        (
            "convergence",
            "Relative |delta| against the number of steps",
            "Both axes are logarithmic; the dashed line is the tolerance.",
            lambda: F.convergence_plot(
                points, method_names=names, tolerance=tolerance, relative=True
            ),
        )
    ]


_FIGURES: dict[str, Callable[[ReportView], list[Drawing]]] = {
    "conductance": _figures_conductance,
    "neuron": _figures_neuron,
    "convergence": _figures_convergence,
}


def _figures_kept(view: ReportView) -> list[Drawing]:
    """The figures a view was built with (pages whose figures are drawn once, by the page)."""
    return [
        (snap.name, snap.title, snap.caption, lambda spec=snap.spec: go.Figure(json.loads(spec)))
        for snap in view.figures
    ]


def view_figures(view: ReportView) -> list[Drawing]:
    """The view's figures, drawn from its arrays on demand: (name, title, caption, draw)."""
    return _FIGURES.get(view.kind, _figures_kept)(view)


def figure_names(view: ReportView) -> list[tuple[str, str]]:
    """(name, title) of the figures a view has, without drawing them."""
    if view.figures:
        return [(f.name, f.title) for f in view.figures]
    return [(name, title) for name, title, _, _ in view_figures(view)]


def figure_spec(view: ReportView, name: str) -> str:
    """One figure of the view as plotly JSON."""
    for snap in view.figures:
        if snap.name == name:
            return snap.spec
    for fig_name, _, _, draw in view_figures(view):
        if fig_name == name:
            return export.figure_json(draw())
    raise ReportError(f"This view has no figure named {name!r}.")


def freeze(view: ReportView) -> ReportView:
    """The view with private read-only arrays and its figures drawn as JSON, ready to keep."""
    arrays = {k: readonly(v) for k, v in view.arrays.items() if v is not None}
    thawed = replace(view, arrays=arrays)
    if view.kind not in _FIGURES:
        return thawed  # its figures were kept as JSON when it was built
    figures = tuple(
        FigureSnapshot(name, title, caption, export.figure_json(draw()))
        for name, title, caption, draw in view_figures(thawed)
    )
    return replace(thawed, figures=figures)


def add_view(views: Sequence[ReportView], view: ReportView) -> list[ReportView]:
    """A new list with ``view`` (frozen) appended; the given list is never changed.

    Raises
    ------
    ReportError
        When the report already holds :data:`MAX_VIEWS` views or would grow past
        :data:`MAX_REPORT_BYTES`.
    """
    if len(views) >= MAX_VIEWS:
        raise ReportError(
            f"The report already holds {MAX_VIEWS} views, the most it can take. Remove some on "
            "the Report page first."
        )
    frozen = view if view.figures else freeze(view)
    total = sum(v.nbytes for v in views) + frozen.nbytes
    if total > MAX_REPORT_BYTES:
        raise ReportError(
            f"This view would bring the report to {total / 2**20:.0f} MB, over the "
            f"{MAX_REPORT_BYTES / 2**20:.0f} MB limit. Remove some views on the Report page, "
            "or add a view of a smaller layer."
        )
    return [*views, frozen]


def move(views: Sequence[ReportView], index: int, step: int) -> list[ReportView]:
    """A new list with the view at ``index`` moved ``step`` places (clamped)."""
    out = list(views)
    if not 0 <= index < len(out):
        return out
    target = min(max(index + step, 0), len(out) - 1)
    out.insert(target, out.pop(index))
    return out


def remove(views: Sequence[ReportView], index: int) -> list[ReportView]:
    """A new list without the view at ``index``."""
    return [v for i, v in enumerate(views) if i != index]


# --- HTML ---------------------------------------------------------------------------------------
def esc(text: object) -> str:
    """Text made safe for HTML element content and attribute values."""
    return _html.escape(str(text), quote=True)


def _json_script(data: str) -> str:
    """JSON text safe inside ``<script type="application/json">`` (no closing tag can appear)."""
    return data.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def png_data_uri(pixels: np.ndarray) -> str:
    """An ``(H, W, 3)`` uint8 image as a PNG data URI."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; font-src data:; connect-src 'none'"
)

_STYLE = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; margin: 0 auto; padding: 24px 32px 64px; max-width: 1040px; color: #1f2430;
  line-height: 1.5; background: #fff; }
h1 { font-size: 1.9rem; margin: 0 0 4px; }
h2 { font-size: 1.4rem; margin: 40px 0 8px; padding-top: 12px; border-top: 2px solid #e4e6eb; }
h3 { font-size: 1.1rem; margin: 24px 0 6px; }
.meta { color: #5b6270; font-size: 0.92rem; }
.intro, .notes { background: #f5f7fa; border-radius: 8px; padding: 12px 16px; }
.notes { white-space: pre-wrap; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 0.93rem; }
th, td { text-align: left; padding: 4px 12px 4px 0; vertical-align: top;
  border-bottom: 1px solid #eceef2; }
th { font-weight: 600; color: #3b4150; }
td.num { font-variant-numeric: tabular-nums; }
code, .digest { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
  font-size: 0.85rem; word-break: break-all; }
.row { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
.row > div { flex: 1 1 300px; min-width: 0; }
img.input { width: 224px; max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
figure { margin: 16px 0 24px; break-inside: avoid; }
figcaption { color: #5b6270; font-size: 0.9rem; }
.plot { width: 100%; min-height: 200px; }
.verdict { border-radius: 8px; padding: 10px 14px; margin: 8px 0; }
.pass { background: #e8f5e9; border: 1px solid #9ccc9f; }
.warn { background: #fff4e5; border: 1px solid #f0b46a; }
nav ol { margin: 4px 0; }
footer { margin-top: 48px; color: #5b6270; font-size: 0.85rem; }
@media print {
  body { padding: 0; max-width: none; }
  section.view { break-before: page; }
  h2 { border-top: none; }
  /* A heading stays with what it introduces; a verdict or a short table is not split. */
  h1, h2, h3 { break-after: avoid; page-break-after: avoid; }
  .verdict, table, .row > div { break-inside: avoid; page-break-inside: avoid; }
}
"""

_DRAW = """
(function () {
  var plots = document.querySelectorAll('div.plot[data-figure]');
  var pending = [];
  plots.forEach(function (div) {
    var spec = JSON.parse(document.getElementById(div.getAttribute('data-figure')).textContent);
    var layout = spec.layout || {};
    layout.autosize = true;
    delete layout.width;
    Object.keys(layout).forEach(function (key) {
      if (/^[xy]axis[0-9]*$/.test(key)) { layout[key].automargin = true; }
    });
    pending.push(Plotly.newPlot(div, spec.data || [], layout,
      {displayModeBar: false, responsive: true, scrollZoom: false}));
  });
  Promise.all(pending).then(function () { window.reportReady = true; },
    function (err) { window.reportReady = true; window.reportError = String(err); });
})();
"""


def _table(rows: Sequence[tuple[str, str]], cls: str = "") -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td{cls}>{esc(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _prediction_table(view: ReportView) -> str:
    if not view.prediction:
        return "<p>No prediction was recorded.</p>"
    head = "share of the output" if view.prediction_is_coverage else "probability"
    rows = "".join(
        f"<tr><td>{esc(label)}</td><td class='num'>#{int(index)}</td>"
        f"<td class='num'>{float(value):.1%}</td></tr>"
        for label, index, value in view.prediction
    )
    return f"<table><tr><th>class</th><th>index</th><th>{esc(head)}</th></tr>{rows}</table>"


def _verdict_html(verdict: Verdict) -> str:
    status = "pass" if verdict.passed else "warn"
    headline = (
        "Converged: the delta is within the tolerance, the maps can be trusted."
        if verdict.passed
        else "Not converged: the delta is larger than the tolerance. Use more steps or "
        "Gauss-Legendre before trusting the maps."
    )
    rows = [
        ("F(image) − F(baseline)", f"{verdict.output_diff:.6g}"),
        ("Convergence delta", f"{verdict.delta:.3e}"),
        ("|delta| relative to the score difference", f"{verdict.relative_delta:.3%}"),
        ("Tolerance", f"{verdict.tolerance:.3%}"),
    ]
    lines = "".join(f"<li>{esc(line)}</li>" for line in verdict.lines)
    return (
        f"<div class='verdict {status}'><strong>{status.upper()}</strong> · {esc(headline)}"
        f"{_table(rows, cls=' class=num')}{'<ul>' + lines + '</ul>' if lines else ''}</div>"
    )


def _view_html(number: int, view: ReportView, counter: list[int]) -> tuple[str, str]:
    anchor = f"view-{number}"
    parts = [
        f"<section class='view' id='{anchor}'>",
        f"<h2>{number}. {esc(view.title)}</h2>",
        f"<p class='meta'>{esc(KINDS.get(view.kind, view.kind))} · collected {esc(view.created)}"
        "</p>",
        f"<p>{esc(EXPLANATIONS.get(view.kind, ''))}</p>",
    ]
    if view.notes.strip():
        parts.append(f"<div class='notes'>{esc(view.notes)}</div>")
    pixels = view.arrays.get("image")
    image = (
        f"<img class='input' alt='{esc(view.image_name)}' src='{png_data_uri(pixels)}'>"
        if pixels is not None
        else ""
    )
    parts.append("<h3>Image and prediction</h3><div class='row'>")
    parts.append(
        f"<div>{image}<p><strong>{esc(view.image_name)}</strong><br>"
        f"sha256 <span class='digest'>{esc(view.image_digest)}</span></p></div>"
    )
    parts.append(f"<div>{_prediction_table(view)}</div></div>")
    parts.append("<h3>Layer and target</h3>")
    rows = [("Layer", view.layer), ("Target", view.target)]
    if view.channel is not None:
        rows.append(("Selected channel", str(view.channel)))
    if view.neuron is not None:
        rows.append(("Selected neuron", str(tuple(view.neuron))))
    rows.extend(view.summary)
    parts.append(_table(rows))
    if view.verdict is not None:
        parts.append("<h3>Convergence verdict</h3>" + _verdict_html(view.verdict))
    if view.figures:
        parts.append("<h3>Maps</h3>")
    for snap in view.figures:
        counter[0] += 1
        fid = f"figure-{counter[0]}"
        parts.append(
            f"<figure><h4>{esc(snap.title)}</h4>"
            f"<div class='plot' data-figure='{fid}-data' data-name='{esc(snap.name)}' "
            f"id='{fid}'></div><figcaption>{esc(snap.caption)}</figcaption></figure>"
            f"<script type='application/json' id='{fid}-data'>{_json_script(snap.spec)}</script>"
        )
    parts.append("<h3>Settings</h3>" + _table(view.settings))
    parts.append("<h3>Model</h3>" + _table(view.model))
    parts.append(
        f"<p>Model digest (sha256): <span class='digest'>{esc(view.model_digest)}</span></p>"
    )
    parts.append("</section>")
    return anchor, "\n".join(parts)


def build_html(
    views: Sequence[ReportView],
    title: str = "Layer explainer review report",
    notes: str = "",
    version: str | None = None,
    created: str | None = None,
) -> str:
    """The whole report as one self-contained HTML page (see the module docstring).

    Raises
    ------
    ReportError
        When there is no view to report.
    """
    if not views:
        raise ReportError(
            "The report is empty. Add a view with “Add this view to the report” on the Layer "
            "conductance, Neuron gradient or Convergence page first."
        )
    version = version or app_version()
    created = created or now()
    title = title.strip() or "Layer explainer review report"
    counter = [0]
    sections = []
    toc = []
    for number, view in enumerate(views, start=1):
        frozen = view if view.figures else freeze(view)
        anchor, body = _view_html(number, frozen, counter)
        sections.append(body)
        toc.append(f"<li><a href='#{anchor}'>{esc(frozen.title)}</a></li>")
    notes_html = f"<h3>Notes</h3><div class='notes'>{esc(notes)}</div>" if notes.strip() else ""
    intro = (
        "This report was written by the layer explainer, a tool that shows how an image model "
        "reaches its decision inside one layer. Each numbered view below records what one page "
        "of the tool showed: the model, the image and what the model predicted for it, the "
        "layer looked at, the maps, whether the numbers can be trusted (the convergence "
        "verdict), and every setting needed to compute the same thing again. In every map "
        "<strong>red</strong> means the unit raises the explained score, <strong>blue</strong> "
        "that it lowers it, and white that it has no effect. Hover a map to read its values."
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            "<html lang='en'><head><meta charset='utf-8'>",
            f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">",
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<meta name='generator' content='{DISTRIBUTION} {esc(version)}'>",
            f"<title>{esc(title)}</title><style>{_STYLE}</style>",
            f"<script>{export.plotly_js()}</script>",
            "</head><body>",
            f"<header><h1>{esc(title)}</h1><p class='meta'>Created {esc(created)} with "
            f"{DISTRIBUTION} version {esc(version)} · {len(views)} "
            f"view{'s' if len(views) != 1 else ''}</p></header>",
            f"<div class='intro'>{intro}</div>",
            notes_html,
            f"<nav><h3>Contents</h3><ol>{''.join(toc)}</ol></nav>",
            *sections,
            f"<footer>{DISTRIBUTION} {esc(version)} · This file is self-contained: it opens "
            "offline and loads nothing from the network.</footer>",
            f"<script>{_DRAW}</script>",
            "</body></html>",
        ]
    )


def build_pdf(html: str) -> bytes:
    """The HTML report printed to PDF by Chromium (raises :class:`export.ChromiumMissing`)."""
    return export.html_pdf(html, ready_js="window.reportReady === true", width=760)


def file_stem(text: str, fallback: str = "report") -> str:
    """A safe file name stem made from a title."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:80]
    return stem or fallback


def embedded_figures(html: str) -> dict[str, list[dict]]:
    """The figure JSON embedded in a report, by figure name (for checks and tests)."""
    out = {}
    pattern = re.compile(
        r"data-figure='(?P<fid>[^']+)' data-name='(?P<name>[^']+)'.*?"
        r"<script type='application/json' id='(?P=fid)'>(?P<json>.*?)</script>",
        re.S,
    )
    for match in pattern.finditer(html):
        out.setdefault(_html.unescape(match["name"]), []).append(json.loads(match["json"]))
    return out


# --- in the app ---------------------------------------------------------------------------------
# The functions below run inside a page: they read the session's choices and the cached results
# and never compute anything new (every result they use was already drawn on the page).
def _quiet(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or ``None`` when it fails (the page already showed that failure)."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - the page that drew this view showed the error already
        return None


def _common(ctx: Any, layer: str) -> dict[str, Any]:
    """The parts every view shares: model card, image, prediction, layer."""
    from webapp import backend
    from webapp import widgets as W

    lm, image, prep = ctx.lm, ctx.image, ctx.prep
    preds = _quiet(backend.predictions, lm, image, prep, 5) or []
    pixels = _quiet(backend.display_image, image, prep)
    return dict(
        created=now(),
        model=model_card(lm.info) + (("Preprocessing", prep.describe()),),
        model_digest=str(lm.sha256),
        image_name=image.name,
        image_digest=image.digest,
        prediction=tuple((str(a), int(b), float(c)) for a, b, c in preds),
        prediction_is_coverage=bool(W.output_positions(lm)),
        layer=layer,
        pixels=pixels,
    )


def setting_names() -> dict[str, dict[str, str]]:
    """The names of the integration methods and baselines, for :func:`settings_rows`."""
    from webapp import state as S

    return {"methods": S.METHOD_NAMES, "baselines": S.BASELINE_NAMES}


_names = setting_names


def _selected_neuron(shape: tuple[int, ...], ctx: Any, layer: str) -> tuple[int, ...] | None:
    """The selected neuron as the engine's raw index into ``layer``'s output of ``shape`` (the
    selection is kept in the layer's layout terms, e.g. feature and patch row and column for a
    transformer), or ``None`` when there is none or it does not exist there."""
    from webapp import layouts as L
    from webapp import state as S

    neuron = S.get(S.NEURON)
    if neuron is None:
        return None
    try:
        neuron = L.raw_neuron(ctx.lm, layer, neuron)
    except ExplainerError:
        return None
    if len(neuron) != len(shape):
        return None
    if not all(0 <= int(i) < s for i, s in zip(neuron, shape, strict=True)):
        return None
    return tuple(int(i) for i in neuron)


def _gradient(ctx: Any, layer: str, neuron: tuple[int, ...] | None) -> np.ndarray | None:
    from webapp import backend

    if neuron is None:
        return None
    grads = _quiet(backend.neuron_gradients, ctx.lm, ctx.image, ctx.prep, layer, [neuron])
    return np.asarray(grads[0].gradient) if grads else None


def conductance_view(ctx: Any, result: Any) -> ReportView:
    """The Layer conductance page as a view: its result, selection and settings."""
    from webapp import state as S
    from webapp import widgets as W

    common = _common(ctx, result.layer)
    pixels = common.pop("pixels")
    # The steps and rule the shown map was computed with: a first look uses fewer than asked.
    settings = replace(S.get(S.SETTINGS), method=result.method, n_steps=int(result.n_steps))
    if result.method != "auto":  # a first look, or fixed steps
        settings = replace(settings, tolerance=None)
    tolerance = float(S.get(S.TOLERANCE))
    attr = np.asarray(result.attributions)
    channel = S.get(S.CHANNEL)
    channel = int(channel) if channel is not None and 0 <= int(channel) < attr.shape[0] else None
    neuron = _selected_neuron(tuple(attr.shape), ctx, result.layer)
    spatial = attr.ndim == 3
    arrays = {
        "attributions": attr,
        "channel_totals": np.asarray(result.channel_totals),
        "spatial": None if result.spatial is None else np.asarray(result.spatial),
        "image": pixels,
        "neuron_gradient": _gradient(ctx, result.layer, neuron),
    }
    dims = {
        "attributions": ("channel", "y", "x") if spatial else ("unit",),
        "channel_totals": ("channel",) if spatial else ("unit",),
        "spatial": ("y", "x"),
        "image": ("y", "x", "rgb"),
        "neuron_gradient": ("rgb", "y", "x"),
    }
    total = float(np.sum(result.channel_totals))
    summary = (
        ("Layer output", " × ".join(str(s) for s in attr.shape)),
        ("F(image) − F(baseline)", f"{result.output_diff:.6g}"),
        ("Sum of conductance", f"{total:.6g}"),
    )
    what = f"neuron {neuron}" if neuron else (f"channel {channel}" if channel is not None else "")
    return ReportView(
        kind="conductance",
        title=f"Layer conductance of {result.layer} for {ctx.image.name}"
        + (f", {what}" if what else ""),
        target=W.target_label(ctx.lm, result.target),
        settings=tuple(settings_rows(settings, _names())),
        summary=summary,
        verdict=Verdict(
            float(result.delta), float(result.output_diff), float(result.relative_delta), tolerance
        ),
        channel=channel,
        neuron=neuron,
        arrays={k: v for k, v in arrays.items() if v is not None},
        dims=dims,
        **common,
    )


def neuron_view(ctx: Any, layer: str) -> ReportView | None:
    """The Neuron gradient page as a view: the selected neuron's activation and gradients."""
    from webapp import backend

    act = _quiet(backend.activation, ctx.lm, ctx.image, ctx.prep, layer)
    if act is None:
        return None
    act = np.asarray(act)
    neuron = _selected_neuron(tuple(act.shape), ctx, layer)
    if neuron is None:
        return None
    grad = _gradient(ctx, layer, neuron)
    common = _common(ctx, layer)
    pixels = common.pop("pixels")
    flat = act[neuron]
    arrays = {"activation": act, "neuron_gradient": grad, "image": pixels}
    return ReportView(
        kind="neuron",
        title=f"Neuron {neuron} of {layer} for {ctx.image.name}",
        target="(none: a neuron gradient explains one unit of the layer, not a class)",
        settings=(("Neuron", str(neuron)), ("Gradient with respect to", "the normalised input")),
        summary=(
            ("Layer output", " × ".join(str(s) for s in act.shape)),
            ("Activation of the neuron", f"{float(flat):.6g}"),
            ("Max |gradient|", f"{float(np.abs(grad).max()):.4g}" if grad is not None else "–"),
        ),
        channel=neuron[0] if len(neuron) >= 2 else None,
        neuron=neuron,
        arrays={k: v for k, v in arrays.items() if v is not None},
        dims={
            "activation": ("channel", "y", "x")[: act.ndim] if act.ndim <= 3 else (),
            "neuron_gradient": ("rgb", "y", "x"),
            "image": ("y", "x", "rgb"),
        },
        **common,
    )


def convergence_view(
    ctx: Any, layer: str, settings: Any, points: Sequence[Any], tolerance: float
) -> ReportView | None:
    """The Convergence page as a view: the sweep for the shown image, and its verdict."""
    from webapp import backend
    from webapp import state as S
    from webapp import widgets as W

    base = _quiet(backend.conductance, ctx.lm, ctx.image, ctx.prep, layer, settings)
    if base is None:
        return None
    methods = list(dict.fromkeys(p.method for p in points))
    lines = []
    for method in methods:
        enough = [p.n_steps for p in points if p.method == method and p.relative_delta <= tolerance]
        name = S.METHOD_NAMES.get(method, method)
        lines.append(
            f"{name}: {min(enough)} steps reach the tolerance."
            if enough
            else f"{name}: not within the tolerance up to "
            f"{max(p.n_steps for p in points if p.method == method)} steps."
        )
    common = _common(ctx, layer)
    pixels = common.pop("pixels")
    arrays = {
        "sweep_method": np.array([methods.index(p.method) for p in points], dtype=np.int64),
        "sweep_n_steps": np.array([p.n_steps for p in points], dtype=np.int64),
        "sweep_delta": np.array([p.delta for p in points], dtype=np.float64),
        "sweep_relative_delta": np.array([p.relative_delta for p in points], dtype=np.float64),
        "image": pixels,
    }
    return ReportView(
        kind="convergence",
        title=f"Convergence of {layer} for {ctx.image.name}",
        target=W.target_label(ctx.lm, base.target),
        settings=(
            *settings_rows(settings, _names()),
            ("Swept methods", ", ".join(S.METHOD_NAMES.get(m, m) for m in methods)),
            ("Swept n_steps", ", ".join(str(s) for s in sorted({p.n_steps for p in points}))),
        ),
        summary=(("Methods swept (index in sweep_method)", ", ".join(methods)),),
        verdict=Verdict(
            float(base.delta),
            float(base.output_diff),
            float(base.relative_delta),
            float(tolerance),
            tuple(lines),
        ),
        arrays={k: v for k, v in arrays.items() if v is not None},
        dims={k: ("point",) for k in arrays if k.startswith("sweep_")}
        | {"image": ("y", "x", "rgb")},
        extra={"methods": tuple(methods), "method_names": dict(S.METHOD_NAMES)},
        **common,
    )


def page_view(
    kind: str,
    title: str,
    *,
    ctx: Any | None,
    layer: str,
    arrays: Mapping[str, Any],
    dims: Mapping[str, Sequence[str]],
    figures: Sequence[tuple[str, str, str, go.Figure]] = (),
    target: str = "",
    settings: Sequence[tuple[str, str]] = (),
    summary: Sequence[tuple[str, str]] = (),
    channel: int | None = None,
    neuron: Sequence[int] | None = None,
    with_image: bool = True,
) -> ReportView:
    """A view of a page that draws its own figures (Neuron card, Layer overview, Compare,
    Dataset): the figures the page showed are kept as JSON, and the arrays behind them.

    ``figures`` holds ``(name, title, caption, figure)``; ``arrays`` the numbers, with their
    dimension names in ``dims`` (``None`` values are left out). Without a model and an image
    in ``ctx`` (the Dataset page reads a stored run) the model and image rows stay empty.
    """
    if ctx is not None and getattr(ctx, "lm", None) is not None and ctx.image is not None:
        common = _common(ctx, layer)
        pixels = common.pop("pixels")
        pixels = pixels if with_image else None
    else:
        common = dict(
            created=now(),
            model=(),
            model_digest="",
            image_name="",
            image_digest="",
            prediction=(),
            prediction_is_coverage=False,
            layer=layer,
        )
        pixels = None
    kept = {k: readonly(v) for k, v in arrays.items() if v is not None}
    if pixels is not None:
        kept["image"] = readonly(pixels)
    return ReportView(
        kind=kind,
        title=title,
        target=target,
        settings=tuple(settings),
        summary=tuple(summary),
        channel=channel,
        neuron=None if neuron is None else tuple(int(i) for i in neuron),
        arrays=kept,
        dims={k: tuple(v) for k, v in dims.items()} | {"image": ("y", "x", "rgb")},
        figures=tuple(
            FigureSnapshot(name, fig_title, caption, export.figure_json(fig))
            for name, fig_title, caption, fig in figures
        ),
        **common,
    )


def _png(view: ReportView, name: str) -> bytes:
    return export.figure_png(figure_spec(view, name))


def _svg(view: ReportView, name: str) -> bytes:
    return export.figure_svg(figure_spec(view, name))


def _csv(view: ReportView, name: str) -> bytes:
    return export.array_csv(view.arrays[name], view.dims.get(name), name=f"Array {name!r}")


class RenderJob:
    """One PNG or SVG download, drawn at most once by whichever asks first.

    Two callers want the same file when its button is clicked: the browser's download request
    (run by the server in a thread of its own) and the page's rerun that the click starts. The
    download gets the file; the rerun waits for the same drawing and shows a clear message
    when it failed (the browser alone would show only a generic error under the button).
    """

    def __init__(self, draw: Callable[[], bytes], fmt: str) -> None:
        import threading

        self._draw = draw
        self._lock = threading.Lock()
        self.fmt = fmt
        self.done = False
        self.data: bytes | None = None
        self.message: str | None = None
        """What the user reads when the drawing failed (:func:`export.render_failure_message`)."""

    def __call__(self) -> bytes:
        with self._lock:
            if not self.done:
                try:
                    self.data = self._draw()
                except Exception as exc:  # noqa: BLE001 - turned into a message for the page
                    self.message = export.render_failure_message(exc, self.fmt)
                self.done = True
        if self.message is not None:
            raise export.ExportError(self.message)
        assert self.data is not None
        return self.data


def _render_jobs_key(key: str) -> str:
    return f"_export_{key}_render_jobs"


def actions_row(key: str, view: ReportView | Callable[[], ReportView | None] | None) -> None:
    """A "Download" menu (every figure as PNG/SVG, every array as CSV, all as NPZ) and an
    "Add this view to the report" button, in one row under a page's views.

    ``view`` is the view, or a function that builds it: then it is built only when the user
    opens the menu or adds the view, so a click elsewhere on the page does not pay for it.
    Downloads are made when clicked (they do not slow the page down). PNG and SVG need
    Chromium on the server; where it is missing the row says so and offers the rest. A PNG or
    SVG that fails to draw (Chromium missing or crashing, a timeout) is explained under the
    row after the click, and nothing else on the page changes.
    """
    import functools

    import streamlit as st

    from webapp import state as S
    from webapp import widgets as W

    if view is None:
        return
    built: list[ReportView | None] = [] if callable(view) else [view]

    def the_view() -> ReportView | None:
        if not built:
            ok, made = W.attempt("Preparing the downloads", view)
            built.append(made if ok else None)
        return built[0]

    previous: dict[str, RenderJob] = dict(st.session_state.get(_render_jobs_key(key)) or {})
    jobs: dict[str, RenderJob] = {}
    clicked: list[str] = []
    # Wide enough at 1024 px for "Download" and the add button's label (they wrap, not clip).
    left, middle, right = st.columns([1.6, 2.6, 1.8], vertical_alignment="center")
    menu = left.popover(
        "Download",
        icon=":material/download:",
        width="stretch",
        key=f"{key}_downloads",
        on_change="rerun",  # its files are listed only while it is open
    )
    with menu:
        # A failed PNG/SVG is said here too: the open menu covers the message under the row.
        notice = st.empty()
        st.markdown("**Figures**")
        chromium = export.chromium_available()
        if not chromium:
            st.caption(INSTALL_HINT_MD)
        shown = the_view() if menu.open else None
        if shown is None and menu.open:
            st.caption("Nothing to download here yet.")
        stem = (
            ""
            if shown is None
            else file_stem(f"{shown.kind}_{shown.layer}_{shown.image_name}", shown.kind)
        )
        for name, title in figure_names(shown) if shown is not None else []:
            a, b, c = st.columns([3, 1, 1], vertical_alignment="center")
            a.caption(esc_md(title))
            for column, fmt, fn, mime in (
                (b, "png", _png, "image/png"),
                (c, "svg", _svg, "image/svg+xml"),
            ):
                job_id = f"{name}_{fmt}"
                jobs[job_id] = RenderJob(functools.partial(fn, shown, name), fmt)
                file_name = f"{stem}_{name}.{fmt}"
                if column.download_button(
                    fmt.upper(),
                    data=jobs[job_id],
                    file_name=file_name,
                    mime=mime,
                    key=f"{key}_dl_{name}_{fmt}",
                    help=f"Save {file_name}",
                    disabled=not chromium,
                    on_click="rerun",  # the rerun shows what went wrong, if anything does
                    width="stretch",
                ):
                    clicked.append(job_id)
        if shown is not None:
            st.markdown("**Arrays**")
        for name, array in shown.arrays.items() if shown is not None else []:
            a, b = st.columns([4, 1], vertical_alignment="center")
            shape = " × ".join(str(s) for s in np.shape(array))
            a.caption(f"{esc_md(name)} · {shape}")
            b.download_button(
                "CSV",
                data=functools.partial(_csv, shown, name),
                file_name=f"{stem}_{name}.csv",
                mime="text/csv",
                key=f"{key}_dl_{name}_csv",
                help=f"Save {stem}_{name}.csv",
                on_click="ignore",
                width="stretch",
            )
        if shown is not None:
            st.download_button(
                "All arrays (NPZ)",
                data=functools.partial(export.arrays_npz, shown.arrays),
                file_name=f"{stem}.npz",
                mime="application/octet-stream",
                key=f"{key}_dl_npz",
                help=f"Save {stem}.npz",
                on_click="ignore",
                icon=":material/folder_zip:",
                width="stretch",
            )
    if menu.open:  # a closed menu keeps the drawings of its last PNG/SVG clicks
        st.session_state[_render_jobs_key(key)] = jobs
    with middle:
        added = st.button(
            "Add this view to the report",
            key=f"{key}_add_report",
            icon=":material/note_add:",
            help="Keep a snapshot of what this page shows now (maps, numbers, settings) for "
            "the review report. Build the report on the Report page.",
        )
    current = list(S.get(S.REPORT_VIEWS) or [])
    snapshot = the_view() if added else None
    if snapshot is not None:
        ok, grown = W.attempt("Adding the view to the report", add_view, current, snapshot)
        if ok and grown is not None:
            st.session_state[S.REPORT_VIEWS] = grown
            current = grown
            st.toast(f"Added to the report ({len(grown)} views).", icon=":material/check:")
    with right:
        if current:
            st.page_link(
                W.PAGE_REPORT,
                label=f"Report: {len(current)} view{'s' if len(current) != 1 else ''} collected",
                icon=":material/description:",
            )
    # A click on PNG or SVG reruns the page: wait for that file's drawing (done once, shared
    # with the download) and say plainly when it failed.
    for job_id in clicked:
        job = previous.get(job_id)
        if job is not None and not job.done:
            with st.spinner(f"Drawing the {job.fmt.upper()} file…"):
                try:
                    job()
                except export.ExportError:
                    pass  # its message is shown below
    for job_id, job in previous.items():
        if job.done and job.message is not None:
            st.error(esc_md(job.message), icon=":material/broken_image:")
            if menu.open:
                notice.error(esc_md(job.message), icon=":material/broken_image:")
            # Said once: a closed menu keeps its jobs, and the message would stay forever.
            kept = st.session_state.get(_render_jobs_key(key)) or {}
            if kept.get(job_id) is job:
                st.session_state[_render_jobs_key(key)] = {
                    k: v for k, v in kept.items() if k != job_id
                }


INSTALL_HINT_MD = (
    "PNG and SVG need Chromium on the server, which is not installed: install it with "
    "`apt-get install chromium` and restart the app. CSV and NPZ work without it."
)


def esc_md(text: object) -> str:
    """Plain text for a Streamlit caption (no markdown)."""
    from webapp.text import md

    return md(text)
