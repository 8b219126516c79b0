"""Sphinx configuration: ``sphinx-build -W -b html docs docs/_build/html`` builds the site (warnings are errors)."""

from __future__ import annotations

import lightning_twophase

project = "lightning-twophase"
author = "lightning-twophase developers"
release = lightning_twophase.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "reproduction", "tools"]  # reproduction/: the raw report, shown by reproduction.md
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = "lightning-twophase"
html_static_path = ["_static"]
nitpicky = False
