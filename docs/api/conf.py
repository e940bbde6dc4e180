"""Sphinx configuration of the API reference (autodoc from the docstrings)."""

import crossent

project = "crossent"
release = version = crossent.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Overload stubs repeat a signature per flag; the reference shows the implementation's.
autodoc_typehints_format = "short"
nitpicky = False
html_theme = "alabaster"
exclude_patterns = ["_build"]
