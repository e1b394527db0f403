"""The review report: views are plain snapshots, the HTML is self-contained, complete, escaped,
and its figures hold exactly the numbers they were drawn from."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from explainer.intake import ModelInfo
from webapp import export
from webapp import report as R

EVIL = "<img src=x onerror=alert(1)>&\"'"


def _values(data) -> np.ndarray:
    """A plotly JSON array as numpy (plotly writes numpy arrays as base64 ``bdata``)."""
    if isinstance(data, dict) and "bdata" in data:
        array = np.frombuffer(base64.b64decode(data["bdata"]), dtype=np.dtype(data["dtype"]))
        if data.get("shape"):
            array = array.reshape([int(d) for d in str(data["shape"]).split(",")])
        return array
    return np.asarray(data, dtype=float)


def _info(name: str = "demo.pt") -> ModelInfo:
    return ModelInfo(
        name=name,
        arch="demo_cnn",
        input_size=(3, 16, 16),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        labels=("circle", EVIL, "triangle"),
        sha256="ab" * 32,
        source_format="state_dict",
        num_params=1234,
    )


def conductance_view(name: str = "cat.png", tolerance: float = 0.05) -> R.ReportView:
    rng = np.random.default_rng(0)
    attr = rng.standard_normal((5, 4, 4))
    grad = rng.standard_normal((3, 16, 16))
    pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    return R.ReportView(
        kind="conductance",
        title=f"Layer conductance of features.3 for {name}",
        created="2026-01-01 12:00 UTC",
        model=R.model_card(_info()),
        model_digest="ab" * 32,
        image_name=name,
        image_digest="cd" * 32,
        prediction=((EVIL, 1, 0.75), ("circle", 0, 0.2)),
        prediction_is_coverage=False,
        layer="features.3",
        target=f"{EVIL} (#1)",
        settings=(("Baseline", "Black image"), ("n_steps", "50")),
        summary=(("F(image) − F(baseline)", "1.5"),),
        verdict=R.Verdict(
            delta=0.01, output_diff=1.5, relative_delta=0.01 / 1.5, tolerance=tolerance
        ),
        channel=2,
        neuron=(2, 1, 3),
        arrays={
            "attributions": attr,
            "channel_totals": attr.sum(axis=(1, 2)),
            "spatial": attr.sum(axis=0),
            "image": pixels,
            "neuron_gradient": grad,
        },
        dims={"attributions": ("channel", "y", "x")},
    )


def convergence_view() -> R.ReportView:
    view = conductance_view()
    return R.ReportView(
        **{
            **{
                f: getattr(view, f)
                for f in (
                    "created",
                    "model",
                    "model_digest",
                    "image_name",
                    "image_digest",
                    "prediction",
                    "layer",
                    "target",
                )
            },
            "kind": "convergence",
            "title": "Convergence",
            "prediction_is_coverage": False,
            "settings": (),
            "verdict": R.Verdict(0.2, 1.0, 0.2, 0.05, ("Gauss-Legendre: 16 steps reach it.",)),
            "arrays": {
                "sweep_method": np.array([0, 0, 1, 1]),
                "sweep_n_steps": np.array([4, 16, 4, 16]),
                "sweep_delta": np.array([0.2, 0.01, 0.3, 0.1]),
                "sweep_relative_delta": np.array([0.2, 0.01, 0.3, 0.1]),
            },
            "extra": {
                "methods": ("gausslegendre", "riemann_trapezoid"),
                "method_names": {"gausslegendre": "Gauss-Legendre"},
            },
        }
    )


@pytest.fixture(scope="module")
def html() -> str:
    views = R.add_view([], conductance_view())
    views = R.add_view(views, convergence_view())
    return R.build_html(views, title=f"Review {EVIL}", notes=f"Check {EVIL}", version="9.9.9")


def test_freeze_makes_a_private_read_only_snapshot():
    source = conductance_view()
    frozen = R.freeze(source)
    source.arrays["attributions"][0, 0, 0] = 1e9  # the page's array changes later...
    assert frozen.arrays["attributions"][0, 0, 0] != 1e9  # ...the snapshot does not
    assert all(not a.flags.writeable for a in frozen.arrays.values())
    assert [f.name for f in frozen.figures] == [
        "channel_totals",
        "channel_maps",
        "all_channels_overlay",
        "channel_map",
        "neuron_gradient",
        "neuron_gradient_abs",
    ]
    assert all(isinstance(f.spec, str) for f in frozen.figures)


def test_html_holds_every_section(html):
    for section in (
        "Image and prediction",
        "Layer and target",
        "Convergence verdict",
        "Maps",
        "Settings",
        "Model",
        "Model digest (sha256)",
        "Contents",
        "Notes",
    ):
        assert section in html, section
    assert "ab" * 32 in html and "cd" * 32 in html  # model and image digests
    assert "version 9.9.9" in html and "features.3" in html
    assert "Tolerance" in html and "5.000%" in html
    assert "PASS" in html and "WARN" in html  # the conductance passes, the sweep view warns
    assert "Gauss-Legendre: 16 steps reach it." in html
    assert "Signed input gradient of neuron (2, 1, 3)" in html  # the selected neuron's maps
    assert html.count("class='plot'") == 7
    assert html.count("<img class='input'") == 1  # the sweep view here has no image


def test_html_escapes_every_user_text(html):
    assert EVIL not in html
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;&#x27;" in html
    assert "<title>Review &lt;img" in html


def test_html_requests_nothing_from_outside(html):
    # plotly.js is inlined from the installed package (it names URLs in messages, never loads).
    js = export.plotly_js()
    assert html.count(js) == 1
    rest = html.replace(js, "")
    rest = re.sub(r"data:[a-z/+.-]+;base64,[A-Za-z0-9+/=]+", "data:", rest)
    assert not re.findall(r"https?://", rest)
    assert not re.findall(r"\b(?:src|href)\s*=\s*['\"](?!data:|#)", rest)
    assert "Content-Security-Policy" in rest and "default-src 'none'" in rest
    assert "@import" not in rest and "url(" not in rest


def test_figures_in_the_report_hold_the_numbers_they_came_from(html):
    view = conductance_view()
    attr, totals = view.arrays["attributions"], view.arrays["channel_totals"]
    figures = R.embedded_figures(html)
    (bars,) = figures["channel_totals"]
    order = np.argsort(-np.abs(totals), kind="stable")
    bar = bars["data"][0]
    np.testing.assert_allclose(np.abs(_values(bar["y"])), np.abs(totals[order]), rtol=1e-12)
    (channel_map,) = figures["channel_map"]
    heat = next(t for t in channel_map["data"] if t["type"] == "heatmap")
    np.testing.assert_allclose(_values(heat["z"]), attr[2], rtol=1e-12)
    (signed,) = figures["neuron_gradient"]
    heat = next(t for t in signed["data"] if t["type"] == "heatmap")
    grad = view.arrays["neuron_gradient"].sum(axis=0)
    np.testing.assert_allclose(_values(heat["z"]), grad, rtol=1e-6)
    (curve,) = figures["convergence"]
    ys = np.concatenate([_values(t["y"]) for t in curve["data"]])
    assert {0.2, 0.01, 0.3, 0.1} <= set(np.round(ys, 12).tolist())


def test_an_empty_report_is_refused_with_a_message():
    with pytest.raises(R.ReportError, match="The report is empty"):
        R.build_html([])


def test_collecting_is_bounded_and_never_changes_the_list(monkeypatch):
    views = R.add_view([], conductance_view())
    monkeypatch.setattr(R, "MAX_VIEWS", 1)
    with pytest.raises(R.ReportError, match="already holds 1"):
        R.add_view(views, conductance_view())
    monkeypatch.setattr(R, "MAX_VIEWS", 10)
    monkeypatch.setattr(R, "MAX_REPORT_BYTES", views[0].nbytes + 10)
    with pytest.raises(R.ReportError, match="over the"):
        R.add_view(views, conductance_view())
    assert len(views) == 1


def test_move_and_remove():
    a, b, c = (conductance_view(n) for n in ("a", "b", "c"))
    assert [v.image_name for v in R.move([a, b, c], 2, -1)] == ["a", "c", "b"]
    assert [v.image_name for v in R.move([a, b, c], 0, -1)] == ["a", "b", "c"]
    assert [v.image_name for v in R.remove([a, b, c], 1)] == ["a", "c"]


def test_version_comes_from_the_package_metadata():
    import importlib.metadata

    assert R.app_version() == importlib.metadata.version("layer-explainer")


def test_file_stem_is_safe():
    assert R.file_stem("../../etc/passwd <x>") == "etc_passwd_x"
    assert R.file_stem("///") == "report"


@pytest.mark.slow
@pytest.mark.skipif(export.chromium_path() is None, reason="Chromium is not installed")
def test_pdf_of_the_report(html):
    pdf = R.build_pdf(html)
    assert pdf.startswith(b"%PDF-") and len(pdf) > 20_000
    # Printed after the figures were drawn: the input image plus the heatmaps and overlays
    # (plotly draws those as images) are in the file, not just the text.
    assert len(re.findall(rb"/Subtype\s*/Image", pdf)) >= 6
    assert len(re.findall(rb"/Type\s*/Page[^s]", pdf)) >= 2
