"""Sphinx configuration of the lm_basics site. `python tools/build_site.py` copies this folder, the processed
notebooks and the pages of nbs/ into one source folder and builds it; it is not meant to be built on its own."""
project = 'lm_basics'
author = 'lm_basics developers'
copyright = '2026 onwards, lm_basics developers'
html_title = 'lm_basics'

extensions = ['myst_nb', 'sphinx.ext.mathjax']
root_doc = 'index'
exclude_patterns = ['_build', '**.ipynb_checkpoints']
nb_execution_mode = 'off'             # built from the outputs committed in the notebooks, never executed
nb_merge_streams = True
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence']
myst_dmath_double_inline = True      # `$$...$$` inside a paragraph, as Jupyter renders it
myst_heading_anchors = 4              # `[text](page.md#a-heading)` links resolve
suppress_warnings = ['myst.header', 'mystnb.unknown_mime_type', 'misc.highlighting_failure']

html_theme = 'furo'
html_static_path = ['_static']
html_css_files = ['lm_basics.css']
html_show_sourcelink = False
html_copy_source = False              # no _sources/: the notebooks are on GitHub
html_last_updated_fmt = None
pygments_style = 'sphinx'

# Equations: MathJax 2 from the copy that build_site.py puts in _static/mathjax (Debian's libjs-mathjax), never a CDN.
# MyST has already found the `$...$` and `$$...$$`, so MathJax typesets only the elements Sphinx marks as math.
mathjax_path = 'mathjax/MathJax.js?config=TeX-AMS_CHTML-full,Safe'
mathjax3_config = None
myst_update_mathjax = False
mathjax2_config = {'tex2jax': {'processClass': 'math|output_area', 'ignoreClass': 'document'},
                   'CommonHTML': {'linebreaks': {'automatic': True}}, 'showMathMenu': False,
                   'messageStyle': 'none'}
