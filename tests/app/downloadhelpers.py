"""The download rows of the pages in AppTest: which files the buttons offer, and their bytes.

Download buttons make their files only when clicked (a callable registered with the media file
manager). AppTest cannot click them, so :func:`capture` records every callable a run registers,
by file name; a test calls it the way the server would on a click and parses the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.testing.v1 import AppTest

from webapp import export


@dataclass
class Offered:
    """One file a download button offers."""

    file_name: str
    mimetype: str | None
    make: Any
    """What the server calls when the button is clicked."""

    def data(self) -> bytes:
        out = self.make()
        return out.encode("utf-8") if isinstance(out, str) else bytes(out)


def capture(monkeypatch: pytest.MonkeyPatch) -> dict[str, Offered]:
    """A dict, filled by every later run, of the files the download buttons offer by name."""
    offered: dict[str, Offered] = {}
    original = MediaFileManager.add_deferred

    def add_deferred(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        if file_name:
            offered[file_name] = Offered(file_name, mimetype, data_callable)
        return original(self, data_callable, mimetype, coordinates, file_name, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add_deferred", add_deferred)
    return offered


def row_files(offered: dict[str, Offered], prefix: str) -> dict[str, Offered]:
    """The offered files whose names start with ``prefix`` (one page's row)."""
    return {name: item for name, item in offered.items() if name.startswith(prefix)}


def csv_array(offered: dict[str, Offered], file_name: str) -> np.ndarray:
    """The array in an offered CSV file, parsed."""
    assert file_name in offered, f"no file {file_name!r}; offered: {sorted(offered)}"
    return export.read_array_csv(offered[file_name].data())


def npz_arrays(offered: dict[str, Offered], file_name: str) -> dict[str, np.ndarray]:
    """The arrays in an offered NPZ file, parsed without unpickling."""
    assert file_name in offered, f"no file {file_name!r}; offered: {sorted(offered)}"
    return export.read_npz(offered[file_name].data())


def download_keys(at: AppTest) -> set[str]:
    """The user keys of the last run's download buttons (``"ovw_dl_share_csv"`` etc.)."""
    return {b.proto.id.rsplit("-", 1)[-1] for b in at.get("download_button")}


def download_helps(at: AppTest) -> set[str]:
    """The tooltips of the last run's download buttons: each names the file it saves."""
    return {b.proto.help for b in at.get("download_button")}


def open_menu(at: AppTest, key: str) -> AppTest:
    """Open the "Download" menu of the row ``key`` (its files are listed only while it is open)
    and run the page."""
    at.session_state[f"{key}_downloads"] = True
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at
