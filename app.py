"""Entry point: ``streamlit run app.py``.

Sets the page config and registers the pages; every page draws the shared sidebar (with the
links between pages) itself through ``webapp.setup()``, so a page also works when run on its own.
"""

import streamlit as st

from webapp.widgets import PAGES, page_config

page_config()

navigation = st.navigation(
    [
        st.Page(path, title=title, icon=icon, default=(i == 0))
        for i, (path, title, icon) in enumerate(PAGES)
    ],
    position="hidden",
)
navigation.run()
