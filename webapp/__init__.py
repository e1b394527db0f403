"""Streamlit glue for the explorer: session state, cached backend, figures and shared widgets.

This package is the only place that uses ``st.cache_resource`` and defines session-state keys;
the pages under ``pages/`` stay thin (read state, ask :mod:`webapp.backend`, draw).
"""

from webapp.widgets import Context, setup

__all__ = ["Context", "setup"]
