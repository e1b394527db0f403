"""The app's own style sheet (``webapp.style``) reaches every page."""

from __future__ import annotations

from apphelpers import ALL_PAGES, open_page

from webapp import style


def test_every_page_gets_the_style_sheet(app):
    for page in ALL_PAGES:
        open_page(app, page)
        sheets = [h.proto.body for h in app.get("html")]
        assert sheets.count(style.CSS.strip()) == 1, page
        assert not app.exception, page
