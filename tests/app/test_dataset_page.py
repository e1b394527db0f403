"""Dataset page: stores from the operator's folder or an upload, class x channel heatmap, the
correct / misclassified slices, the images that drive a channel, and plain messages for files
that are not results stores."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from apphelpers import (
    PAGE_DATASET,
    error_text,
    open_page,
    plotly_specs,
    values,
    visible,
    widget,
)
from downloadhelpers import capture, csv_array, download_keys, npz_arrays, open_menu, row_files
from PIL import Image

from explainer.batch.runner import BatchSettings, run_batch
from explainer.batch.store import ResultsStore
from explainer.compute import ModelSource
from explainer.demo import DEMO_LABELS, render_sample

LAYERS = ("block1", "block2", "block3")
STORE = "shapes.sqlite"


class InProcessExecutor:
    """The job interface on a ModelSession in this process (as in tests/test_batch.py)."""

    parallelism = 1

    def __init__(self) -> None:
        self.sessions = {}

    def submit(self, model, op, args=None):
        from explainer.compute import ModelSession
        from explainer.compute.jobs import JobHandle

        handle = JobHandle(op)
        session = self.sessions.setdefault(model.key, ModelSession(model))
        try:
            handle.set_result(session.run(op, args or {}))
        except Exception as exc:  # noqa: BLE001 - the handle carries it
            handle.set_exception(exc)
        return handle

    def shutdown(self) -> None:
        pass


def build_dataset(root: Path) -> Path:
    """Class folders of the demo's shapes; two shapes filed under another class (so that the
    model's correct answer disagrees with their folder), and one broken file."""
    rng = np.random.default_rng(0)
    for i in range(8):
        shape = DEMO_LABELS[i % len(DEMO_LABELS)]
        folder = shape if i < 6 else DEMO_LABELS[(i + 1) % len(DEMO_LABELS)]
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_sample(shape, rng)).save(root / folder / f"img{i:02d}.png")
    (root / DEMO_LABELS[0] / "broken.png").write_bytes(b"not a picture")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A dataset folder holding one store made by an in-process run."""
    base = tmp_path_factory.mktemp("dataset")
    images = build_dataset(base / "images")
    runs = base / "runs"
    runs.mkdir()
    summary = run_batch(
        ModelSource("builtin"),
        images,
        runs / STORE,
        BatchSettings(layers=LAYERS, n_steps=8, labels_from_folders=True),
        InProcessExecutor(),
    )
    assert summary.ok == 8 and summary.bad == 1
    return runs


@pytest.fixture
def on_store(app, runs, monkeypatch):
    monkeypatch.setenv("EXPLAINER_DATASET_DIR", str(runs))
    return open_page(app, PAGE_DATASET)


def frame(at, column: str):
    """The dataframe of the last run that has ``column``."""
    for element in at.dataframe:
        if column in element.value.columns:
            return element.value
    raise AssertionError(f"no table with a {column!r} column")


def labels_of(runs: Path) -> dict[str, tuple[int, int]]:
    with ResultsStore(runs / STORE, readonly=True) as store:
        return {r.path: (r.true_label, r.predicted) for r in store.images("ok")}


def test_an_empty_dataset_folder_says_how_to_make_a_store(app, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLAINER_DATASET_DIR", str(tmp_path))
    open_page(app, PAGE_DATASET)
    assert app.title[0].value == "Dataset"
    text = visible(" ".join(i.value for i in app.info))
    assert "no results store" in text and "explainer batch" in text
    assert "EXPLAINER_DATASET_DIR" in text
    assert not app.error
    assert "ds_heatmap" not in plotly_specs(app)


def test_a_store_shows_the_class_channel_heatmap_and_the_top_channels(on_store, runs):
    at = on_store
    assert not at.error, error_text(at)
    assert widget(at, "selectbox", "_w_ds_store").value == STORE
    assert widget(at, "selectbox", "_w_ds_layer").value == "block3"
    heat = plotly_specs(at)["ds_heatmap"]
    z = values(heat["data"][0]["z"])
    with ResultsStore(runs / STORE, readonly=True) as store:
        paths, totals = store.channel_matrix("block3", "conductance")
        true = {r.path: r.true_label for r in store.images("ok")}
    classes = sorted({true[p] for p in paths})
    assert z.shape == (len(classes), totals.shape[1])
    for row, cls in enumerate(classes):
        rows = [i for i, p in enumerate(paths) if true[p] == cls]
        assert np.allclose(z[row], totals[rows].astype(np.float64).mean(axis=0), atol=1e-6)
    # Every cell has a clickable marker carrying [class, channel].
    markers = heat["data"][1]
    assert markers["type"] == "scatter" and len(markers["customdata"]) == z.size
    table = frame(at, "mean conductance")
    assert list(table.columns) == ["class", "rank", "channel", "mean conductance"]
    assert len(table) == 5 * len(classes)
    first = table[table["class"] == DEMO_LABELS[classes[0]]].iloc[0]
    assert abs(first["mean conductance"]) == pytest.approx(np.abs(z[0]).max(), rel=1e-5)
    # The broken file is listed with its reason, not hidden.
    problems = [e for e in at.expander if "without results" in e.label]
    assert problems


def test_correct_and_misclassified_slices_change_what_is_shown(on_store, runs):
    at = on_store
    known = labels_of(runs)
    correct = sum(t == p for t, p in known.values())
    wrong = len(known) - correct
    assert correct and wrong, "the dataset should hold both kinds"

    def shown_count() -> int:
        caption = next(c.value for c in at.caption if "image(s) in the slice" in c.value)
        return int(caption.split(" image(s) in the slice")[0].split()[-1])

    assert shown_count() == len(known)
    all_z = values(plotly_specs(at)["ds_heatmap"]["data"][0]["z"])
    widget(at, "radio", "_w_ds_slice").set_value("correct")
    at.run()
    assert not at.exception and not at.error
    assert shown_count() == correct
    correct_z = values(plotly_specs(at)["ds_heatmap"]["data"][0]["z"])
    widget(at, "radio", "_w_ds_slice").set_value("incorrect")
    at.run()
    assert shown_count() == wrong
    wrong_z = values(plotly_specs(at)["ds_heatmap"]["data"][0]["z"])
    assert not np.array_equal(all_z, correct_z) or not np.array_equal(all_z, wrong_z)
    # The top images of the selected channel come from the slice only.
    table = frame(at, "strongest activation")
    assert set(table["image"]) <= {p for p, (t, q) in known.items() if t != q}


def test_choosing_a_channel_by_number_shows_the_images_that_drive_it(on_store, runs):
    at = on_store
    widget(at, "selectbox", "_w_ds_layer").set_value("block2")
    at.run()
    widget(at, "number_input", "_w_ds_channel").set_value(3)
    at.run()
    assert not at.exception and not at.error
    assert at.session_state["dataset_neuron"] == ("block2", 3)
    with ResultsStore(runs / STORE, readonly=True) as store:
        expected = store.top_images("block2", 3, k=8)
    table = frame(at, "strongest activation")
    assert list(table["image"]) == [p for p, _ in expected]
    assert np.allclose(table["strongest activation"], [v for _, v in expected])
    # The image files are reachable (the run's folder), so thumbnails are shown.
    assert len(at.get("image")) >= len(expected)
    info = visible(" ".join(i.value for i in at.info))
    assert "block2" in info and "channel **3**" in info


def upload(at, name: str, data: bytes):
    widget(at, "radio", "_w_ds_source").set_value("upload")
    at.run()
    widget(at, "file_uploader", "_w_ds_upload").set_value((name, data, "application/octet-stream"))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_an_uploaded_store_is_read_and_its_images_are_named(on_store, runs):
    at = upload(on_store, "copy.sqlite", (runs / STORE).read_bytes())
    assert not at.error, error_text(at)
    assert "ds_heatmap" in plotly_specs(at)
    # An upload's image files are never looked up on the server: names only.
    assert not at.get("image") or all("img" not in str(i.value) for i in at.get("image"))
    captions = " ".join(c.value for c in at.caption)
    assert "listed by name" in captions


def test_a_file_that_is_not_sqlite_gives_a_plain_message(on_store):
    at = upload(on_store, "junk.sqlite", b"this is not a database at all" * 100)
    message = error_text(at)
    assert "not an SQLite database" in message
    assert "Traceback" not in message
    assert "ds_heatmap" not in plotly_specs(at)


def test_a_damaged_sqlite_file_gives_a_plain_message(on_store, runs):
    data = bytearray((runs / STORE).read_bytes())
    data[200:4000] = b"\xff" * 3800
    at = upload(on_store, "damaged.sqlite", bytes(data))
    message = error_text(at)
    assert "damaged" in message or "not a results store" in message, message
    assert "ds_heatmap" not in plotly_specs(at)


def test_an_sqlite_file_that_is_not_a_results_store_gives_a_plain_message(on_store, tmp_path):
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.execute("INSERT INTO notes (text) VALUES ('hello')")
    db.close()
    at = upload(on_store, "other.sqlite", other.read_bytes())
    message = error_text(at)
    assert "not a results store" in message and "explainer batch" in message
    assert str(tmp_path) not in message
    assert "ds_heatmap" not in plotly_specs(at)


def test_an_upload_over_the_limit_is_refused(on_store, runs, monkeypatch):
    monkeypatch.setenv("EXPLAINER_MAX_STORE_MB", "0.01")
    at = upload(on_store, "big.sqlite", (runs / STORE).read_bytes())
    assert "more than the" in error_text(at)


def test_a_run_of_the_session_images_writes_and_opens_a_new_store(app, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLAINER_DATASET_DIR", str(tmp_path))
    at = open_page(app, PAGE_DATASET)
    widget(at, "number_input", "_w_ds_steps").set_value(4)
    at.run()
    widget(at, "button", "_w_ds_start").click()
    at.run()
    assert not at.exception
    deadline = time.monotonic() + 240
    while at.session_state["dataset_job"] if "dataset_job" in at.session_state else False:
        assert time.monotonic() < deadline, "the run did not finish"
        time.sleep(1.0)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
    assert not at.error, error_text(at)
    stores = sorted(tmp_path.glob("app-*.sqlite"))
    assert len(stores) == 1
    assert widget(at, "selectbox", "_w_ds_store").value == stores[0].name
    assert "ds_heatmap" in plotly_specs(at)
    with ResultsStore(stores[0], readonly=True) as store:
        assert store.counts()["ok"] == len(at.session_state["images"])


def test_a_run_shows_its_progress_and_stops_on_request(app, tmp_path, monkeypatch):
    """The page's side of a run (the run itself is replaced: it waits until it is stopped)."""
    from explainer.batch.runner import BatchSummary
    from webapp import dataset

    calls = {}

    def waiting_run(source, images, out, settings, executor, *, stop, on_record):
        calls["images"] = sorted(p.name for p in Path(images).iterdir())
        with ResultsStore(out) as store:
            store.begin({"layers": ["block3"]}, {"name": "test"})
        on_record("first.png")
        assert stop.wait(60), "the page never asked the run to stop"
        return BatchSummary(total=3, ok=1, interrupted=True)

    monkeypatch.setattr(dataset, "run_batch", waiting_run)
    monkeypatch.setenv("EXPLAINER_DATASET_DIR", str(tmp_path))
    at = open_page(app, PAGE_DATASET)
    widget(at, "button", "_w_ds_start").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    images = at.session_state["images"]
    assert len(calls["images"]) == len(images)
    assert widget(at, "button", "_w_ds_start").disabled
    bar = at.get("progress")[0]
    assert "Explaining image 1 of" in bar.proto.text
    widget(at, "button", "_w_ds_stop").click()
    at.run()
    deadline = time.monotonic() + 30
    while "dataset_job" in at.session_state:
        assert time.monotonic() < deadline
        time.sleep(0.2)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    success = visible(" ".join(s.value for s in at.success))
    assert "The run was stopped: 1 explained" in success
    info = visible(" ".join(i.value for i in at.info))
    assert "holds no explained image yet" in info


@pytest.mark.parametrize(
    "change, expected",
    [
        ("UPDATE layers SET conductance = x'0000'", "damaged"),
        ("UPDATE images SET top = '{'", "damaged"),
        ("DROP TABLE layers; CREATE VIEW layers AS SELECT * FROM images", "no layers table"),
        ("UPDATE run SET value = '7' WHERE key = 'schema'", "layout version 7"),
    ],
)
def test_a_tampered_store_gives_a_plain_message(on_store, runs, tmp_path, change, expected):
    copy = tmp_path / "tampered.sqlite"
    copy.write_bytes((runs / STORE).read_bytes())
    db = sqlite3.connect(copy)
    db.execute("PRAGMA journal_mode=DELETE")
    db.executescript(change)
    db.commit()
    db.close()
    at = upload(on_store, "tampered.sqlite", copy.read_bytes())
    message = error_text(at)
    assert expected in message, message
    assert str(tmp_path) not in message
    assert "ds_heatmap" not in plotly_specs(at)


def test_the_heatmap_and_the_table_download_as_shown(app, runs, monkeypatch):
    offered = capture(monkeypatch)
    monkeypatch.setenv("EXPLAINER_DATASET_DIR", str(runs))
    open_page(app, PAGE_DATASET)
    open_menu(app, "ds")
    assert not app.error, error_text(app)
    files = row_files(offered, "dataset_block3")
    (npz,) = [name for name in files if name.endswith(".npz")]
    stem = npz[: -len(".npz")]
    assert {
        f"{stem}_class_channel_heatmap.png",
        f"{stem}_class_channel_heatmap.svg",
        f"{stem}_heatmap.csv",
        f"{stem}_mean_conductance.csv",
        f"{stem}_top_mean_conductance.csv",
    } <= set(files)
    assert {"ds_dl_class_channel_heatmap_png", "ds_dl_heatmap_csv", "ds_dl_npz"} <= (
        download_keys(app)
    )
    z = np.asarray(values(plotly_specs(app)["ds_heatmap"]["data"][0]["z"]), dtype=np.float64)
    np.testing.assert_allclose(csv_array(files, f"{stem}_heatmap.csv"), z, rtol=1e-12)
    arrays = npz_arrays(files, npz)
    table = frame(app, "mean conductance")
    np.testing.assert_allclose(arrays["top_mean_conductance"], table["mean conductance"])
    np.testing.assert_array_equal(arrays["top_channel"], table["channel"])
    names = [DEMO_LABELS[c] for c in arrays["top_class"]]
    assert names == list(table["class"])
    # The heatmap is every class's row of the full matrix, at the drawn channels.
    rows = [list(arrays["classes"]).index(c) for c in arrays["heatmap_classes"]]
    np.testing.assert_allclose(
        arrays["mean_conductance"][rows][:, arrays["heatmap_channels"]], arrays["heatmap"]
    )
    assert "image" not in arrays  # the session's image is not the store's
