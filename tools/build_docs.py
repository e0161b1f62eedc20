"""Build the notebooks into a static HTML site, without Quarto.

nbdev's own docs (`nbdev_docs`, `nbdev_preview`) need Quarto, which cannot be installed everywhere. This is the
second path: nbdev's notebook processing (directives, hidden cells, `show_doc` for every exported symbol), a fresh
Jupyter kernel to execute the notebooks (`--execute`), and nbconvert's `HTMLExporter` to render each one as a page
with a sidebar in notebook order. Links between notebooks (`02_model.ipynb`) and nbdev's doc links to exported
symbols point at the built pages; figures are embedded as PNG. `tests/test_docs_site.py` loads the result in
headless Chromium.

Usage: python tools/build_docs.py [--out _site] [--execute] [--jobs 1] [--timeout 900] [--mathjax_url URL]
       python tools/build_docs.py --quarto_config   # rewrite nbs/_quarto.yml, nbdev.yml, sidebar.yml as nbdev would

The notebooks are committed without outputs, so `--execute` is what gives pages their outputs and figures; without
it the pages show the prose, the code and the API docs only (nbdev runs `show_doc` in-process, as `nbdev_docs` does).
Cells marked with a test flag (`#| slow`) or `#| eval: false` are shown but not run. Equations use MathJax 2: a local
copy (Debian's `libjs-mathjax`) is copied into the site when there is one, else the pages load it from a CDN and,
offline, show the TeX source.
"""
from __future__ import annotations
import argparse, html, json, os, re, shutil, tempfile, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
SITE_CSS = 'site.css'
MARKER = '.lm_basics_docs'  # written into every site, so a rebuild only ever replaces a directory this script made

# Run in the kernel (or, without --execute, in this process) before a notebook: nbdev 2.4.14's `show_doc` puts the
# docments into the signature as comments; the site adds fastcore's docments table under it, as older nbdev did.
# A symbol defined in the notebook is documented from its exported twin in the library, which has a source file.
SHOWDOC_SETUP = r'''
import html as _html, inspect as _inspect
import nbdev.showdoc as _nbdev_showdoc
from fastcore.docments import DocmentTbl as _DocmentTbl

def _cell_text(o):
    "A table cell: names of types, reprs of the rest, with `|` and `<` escaped (`str | None`, `<factory>`)."
    if o is _inspect._empty: return ''
    return _html.escape(o.__name__ if isinstance(o, type) else str(o)).replace('|', '&#124;')

class _ParamTable(_DocmentTbl):
    "fastcore's docments table, safe for annotations that contain `|`."
    def _row(self, nm, props): return [f'`{nm}`'] + [_cell_text(props[c]) for c in self._columns]
    @property
    def return_str(self): return '| **Returns** | ' + ' | '.join(_cell_text(self.dm['return'][c]) for c in self._columns) + ' |'

_DOCS_MODULE = __DOCS_MODULE__  # the module this notebook exports (`#| default_exp`)

def _lib_twin(sym):
    "The exported library's object for a symbol this notebook defined: docments need a source file, a kernel cell has none."
    if not _DOCS_MODULE or getattr(sym, '__module__', None) != '__main__': return sym
    import importlib
    try: obj = importlib.import_module(_DOCS_MODULE)
    except ImportError: return sym
    for part in getattr(sym, '__qualname__', '?').split('.'): obj = getattr(obj, part, None)
    return sym if obj is None or type(obj) is not type(sym) else obj

_nbdev_showdoc._OrigRenderer = _base = getattr(_nbdev_showdoc, '_OrigRenderer', _nbdev_showdoc.BasicMarkdownRenderer)
class _SiteRenderer(_base):
    "nbdev's `show_doc` markdown (heading, signature, docstring), then the parameter table."
    def __init__(self, sym, *args, **kwargs): super().__init__(_lib_twin(sym), *args, **kwargs)
    def _repr_markdown_(self):
        md = super()._repr_markdown_()
        try: tbl = _ParamTable(self.sym)._repr_markdown_()
        except Exception: tbl = ''
        return md + ('\n\n' + tbl if tbl else '')

_nbdev_showdoc.BasicMarkdownRenderer = _SiteRenderer
from nbdev.showdoc import show_doc
'''

def showdoc_setup(nb) -> str:
    "`SHOWDOC_SETUP` for a notebook, told which library module the notebook exports."
    from nbdev.config import get_config
    from nbdev.processors import _default_exp
    exp = _default_exp(nb)
    return SHOWDOC_SETUP.replace('__DOCS_MODULE__', repr(f'{get_config().lib_name}.{exp}' if exp else None)).strip()

# ---------------------------------------------------------------------------------------------------------------
# Which notebooks, in which order

def notebooks(nbs:Path=NBS) -> list[Path]:
    "The notebooks of the book in reading order: `index.ipynb` first, then the numbered ones by name."
    nbs = [p for p in Path(nbs).glob('*.ipynb') if not p.name.startswith(('_', '.'))]
    return sorted(nbs, key=lambda p: (p.name != 'index.ipynb', p.name))

def page_name(nb:Path|str) -> str: return Path(nb).stem + '.html'

def nb_title(path:Path) -> tuple[str, str]:
    "Title and one-line description from a notebook's first `# Title` / `> summary` markdown cell (nbdev's rule)."
    from nbdev.frontmatter import _md2dict
    for c in json.loads(Path(path).read_text(encoding='utf-8'))['cells']:
        if c['cell_type'] == 'markdown':
            d = _md2dict(''.join(c['source']))
            if d: return str(d.get('title', path.stem)), str(d.get('description', ''))
    return path.stem, ''

# ---------------------------------------------------------------------------------------------------------------
# nbdev's processing, in two halves around the execution

def _tst_flags() -> set[str]:
    from nbdev.config import get_config
    return set(get_config().get('tst_flags', '').split())

def _skip_reason(cell, flags) -> str|None:
    "Why a code cell is not executed for the docs: a test flag (`#| slow`), `#| eval: false`, or `nbdev_export()`."
    d = getattr(cell, 'directives_', {}) or {}
    hit = sorted(flags & set(d))
    if hit: return f'#| {hit[0]}'
    if (d.get('eval:') or [''])[0].lower() == 'false': return '#| eval: false'
    if 'nbdev_export'+'()' in cell.source: return 'nbdev_export()'

def prepare(path:Path, execute:bool):
    """Read a notebook and run the first half of nbdev's docs processors on it: add a `show_doc` cell after each
    exported definition and tag the cells that must not run. Directives stay in the source for the second half."""
    from execnb.nbio import read_nb, mk_cell
    from nbdev.process import NBProcessor
    from nbdev.processors import populate_language, add_show_docs
    nb = read_nb(path)
    if not execute: return nb
    NBProcessor(nb=nb, procs=[populate_language, add_show_docs], rm_directives=False).process()
    flags = _tst_flags()
    for cell in nb.cells:
        if cell.cell_type == 'code' and (why := _skip_reason(cell, flags)):
            cell.metadata.setdefault('tags', []).append('skip-execution')
            cell.metadata['docs_skipped'] = why
    setup = mk_cell(showdoc_setup(nb), metadata={'tags': ['docs-setup']})
    nb.cells.insert(0, setup)
    return nb

def kernel_env(tmp:Path) -> dict:
    "A kernel's environment: its own IPython dir and (empty) data cache under `tmp`, inline PNG figures, W&B offline."
    env = dict(os.environ)
    env.update(IPYTHONDIR=str(tmp/'ipython'), LM_BASICS_CACHE=str(tmp/'cache'),
               MPLBACKEND='module://matplotlib_inline.backend_inline',  # not Agg: figures become PNG outputs
               PYDEVD_DISABLE_FILE_VALIDATION='1')  # quiets the debugger's frozen-modules warning
    env.setdefault('WANDB_MODE', 'offline')
    (tmp/'ipython').mkdir(parents=True, exist_ok=True); (tmp/'cache').mkdir(parents=True, exist_ok=True)
    return env

def execute_nb(nb, cwd:Path, env:dict, timeout:int):
    "Run a prepared notebook top to bottom in a fresh `python3` kernel (nbclient); returns the executed notebook."
    import nbformat
    from nbclient import NotebookClient
    from execnb.nbio import nb2dict, dict2nb
    node = nbformat.reads(json.dumps(_plain(nb2dict(nb))), as_version=4)
    from traitlets.config import Config
    c = Config()  # Unix sockets, not TCP ports: nothing listens on the network (and ipykernel has nothing to warn about)
    c.KernelManager.transport, c.KernelManager.ip = 'ipc', str(Path(env['IPYTHONDIR']).parent/'kernel')
    client = NotebookClient(node, config=c, timeout=timeout, kernel_name='python3', allow_errors=False,
                            shutdown_kernel='immediate', skip_cells_with_tag='skip-execution',
                            resources={'metadata': {'path': str(cwd)}})
    client.execute(env=env, cwd=str(cwd))
    res = dict2nb(json.loads(json.dumps(node)))
    res['path_'] = nb['path_']
    return res

def _plain(d):
    "A notebook dict with only nbformat's keys in its cells (nbdev marks some cells with its own attributes)."
    keep = {'cell_type', 'source', 'metadata', 'outputs', 'execution_count', 'id', 'attachments'}
    d['cells'] = [{k: v for k, v in c.items() if k in keep} for c in d['cells']]
    for c in d['cells']:
        if c['cell_type'] == 'code': c.setdefault('outputs', []); c.setdefault('execution_count', None)
    return d

def finish(nb, execute:bool):
    """The rest of nbdev's docs processors (`FilterDefaults`): frontmatter from the title cell, directives removed,
    `#| hide`/`#| export` cells dropped, `show_doc` inputs hidden, doc links added. Without `--execute`, nbdev also
    adds and runs the `show_doc` cells in-process, exactly as `nbdev_docs` does."""
    from nbdev.process import NBProcessor
    from nbdev.processors import FilterDefaults, add_show_docs, insert_warning, exec_show_docs
    drop = {insert_warning} | ({add_show_docs, exec_show_docs} if execute else set())
    procs = [p for p in FilterDefaults().procs() if p not in drop]
    if execute: nb.cells = [c for c in nb.cells if 'docs-setup' not in c.metadata.get('tags', [])]
    else: exec(showdoc_setup(nb), {})
    NBProcessor(nb=nb, procs=procs, rm_directives=True).process()
    if nb.cells and nb.cells[0].cell_type == 'raw' and nb.cells[0].source.startswith('---'): nb.cells.pop(0)
    return nb

# ---------------------------------------------------------------------------------------------------------------
# From nbdev's processed notebook to nbconvert's input

_re_qopt = re.compile(r'^\s*#\|\s*([\w-]+)\s*:\s*(.*?)\s*$')
_re_src = re.compile(r'\[source\]\(([^)\s]*)\)\{[^}\n]*\}')  # show_doc's source link, in Quarto's attribute syntax
_re_attr = re.compile(r'(\]\([^)\s]*\))\{[^}\n]*\}')  # other Quarto [text](url){...}: keep the link, drop the attrs

def _source_link(m):
    url = m[1].removesuffix('#LNone')  # no line number when the symbol was defined in a kernel
    return f'<a class="lm-source" href="{html.escape(url)}" target="_blank" rel="noopener">source</a>'

def to_nbformat(nb):
    """Turn the Quarto cell options nbdev leaves (`#| echo: false`, `#| output: asis`, `#| code-fold: ...`) into
    nbconvert's remove tags, and drop Quarto-only markdown attributes from `show_doc` output."""
    import nbformat
    from execnb.nbio import nb2dict
    d = _plain(nb2dict(nb))
    for c in d['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'code':
            lines, opts = src.splitlines(), {}
            while lines and (m := _re_qopt.match(lines[0])):
                opts[m[1]] = m[2].strip('\'"').lower(); lines.pop(0)
            src = '\n'.join(lines).strip('\n')
            tags = c['metadata'].setdefault('tags', [])
            if opts.get('include') == 'false': tags.append('remove_cell')
            if opts.get('echo') == 'false' or not src.strip(): tags.append('remove_input')
            if opts.get('output') == 'false': tags.append('remove_output')
            for o in c.get('outputs', []):
                md = o.get('data', {}).get('text/markdown')
                if md is not None:
                    md = ''.join(md)
                    o['data']['text/markdown'] = _re_attr.sub(r'\1', _re_src.sub(_source_link, md))
            if (why := c['metadata'].get('docs_skipped')) and src.strip():
                c['outputs'] = [{'output_type': 'display_data', 'metadata': {}, 'data': {
                    'text/html': f'<div class="lm-skipped">not run when the docs are built ({html.escape(why)})</div>',
                    'text/plain': f'not run when the docs are built ({why})'}}]
        c['source'] = src
    return nbformat.reads(json.dumps(d), as_version=4)

# ---------------------------------------------------------------------------------------------------------------
# Rendering

TEMPLATE = r'''{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_js_mathjax -%}
{%- if resources.site.has_math -%}{{ super() }}{%- endif -%}
{%- endblock html_head_js_mathjax -%}
{% block extra_css %}<link rel="stylesheet" href="{{ resources.site.css }}">{% endblock extra_css %}
{%- block body_header -%}
<body class="jp-Notebook lm-docs" data-jp-theme-light="true" data-jp-theme-name="JupyterLab Light">
<nav class="lm-sidebar" aria-label="Notebooks">
  <a class="lm-brand" href="index.html">{{ resources.site.name | e }}</a>
  <ol>
  {%- for p in resources.site.pages %}
    <li{% if p.href == resources.site.current %} class="active" aria-current="page"{% endif %}><a href="{{ p.href }}">{{ p.title_html }}</a></li>
  {%- endfor %}
  </ol>
</nav>
<main class="lm-main">
<header class="lm-title">
  <h1 class="title" id="page-title">{{ resources.site.title_html }}</h1>
  {%- if resources.site.description %}
  <p class="description">{{ resources.site.description_html }}</p>
  {%- endif %}
</header>
{%- endblock body_header -%}
{% block body_footer %}
<footer class="lm-pager">
  {%- if resources.site.prev %}<a class="prev" href="{{ resources.site.prev.href }}">&larr; {{ resources.site.prev.title_html }}</a>{% endif %}
  {%- if resources.site.next %}<a class="next" href="{{ resources.site.next.href }}">{{ resources.site.next.title_html }} &rarr;</a>{% endif %}
</footer>
</main>
</body>
{% endblock body_footer %}
'''

CSS = '''/* lm_basics docs site (tools/build_docs.py): a sidebar in notebook order next to nbconvert's lab layout */
body.lm-docs { margin: 0; padding: 0; }
.lm-sidebar { position: fixed; top: 0; left: 0; bottom: 0; width: 15rem; overflow-y: auto; padding: 1.5rem 1rem;
  box-sizing: border-box; background: #f6f8fa; border-right: 1px solid #e1e4e8;
  font-family: var(--jp-ui-font-family, system-ui, sans-serif); font-size: 0.95rem; }
.lm-sidebar .lm-brand { display: block; font-weight: 700; font-size: 1.2rem; color: #24292e; text-decoration: none; margin-bottom: 1rem; }
.lm-sidebar ol { list-style: none; margin: 0; padding: 0; }
.lm-sidebar li a { display: block; padding: 0.3rem 0.5rem; border-radius: 4px; color: #0366d6; text-decoration: none; line-height: 1.3; }
.lm-sidebar li a:hover { background: #e8eef5; }
.lm-sidebar li.active a { background: #0366d6; color: #fff; }
.lm-main { margin-left: 15rem; padding: 1.5rem 2.5rem 3rem; max-width: 62rem; box-sizing: border-box; }
.lm-title { margin: 0 0 1.5rem 0; padding-left: var(--jp-cell-padding, 5px); }
.lm-title h1.title { font-size: 2.2rem; margin: 0.3rem 0 0.4rem; }
.lm-title p.description { font-size: 1.2rem; font-style: italic; opacity: 0.75; margin: 0; }
.lm-pager { display: flex; justify-content: space-between; margin-top: 3rem; padding-top: 1rem; border-top: 1px solid #e1e4e8; }
.lm-pager .next { margin-left: auto; }
.jp-RenderedMarkdown table { font-size: 0.9rem; }
.jp-MarkdownCell .jp-RenderedMarkdown pre { background: #f6f8fa; border: 1px solid #e1e4e8; border-radius: 4px; padding: 0.5rem 0.75rem; }
.jp-RenderedMarkdown hr { margin: 2rem 0 0.5rem; }
.lm-source { float: right; font-size: smaller; }
.jp-Cell .lm-skipped { font-size: 0.8rem; color: #6a737d; font-style: italic; padding: 0 0 0 0.5rem; }
@media (max-width: 52rem) { .lm-sidebar { position: static; width: auto; } .lm-main { margin-left: 0; padding: 1rem; } }
'''

# MathJax 2, from this machine when it has a copy (Debian's libjs-mathjax, or $LM_BASICS_MATHJAX): the files the
# `TeX-AMS_CHTML-full,Safe` configuration nbconvert asks for are copied into the site, so math renders offline.
MATHJAX_DIRS = ['/usr/share/javascript/mathjax', '/usr/share/nodejs/mathjax']
MATHJAX_FILES = ['MathJax.js', 'config/TeX-AMS_CHTML-full.js', 'config/Safe.js', 'extensions', 'jax/input/TeX',
                 'jax/element', 'jax/output/CommonHTML', 'fonts/HTML-CSS/TeX/woff', 'localization/en']
MATHJAX_CONFIG = '?config=TeX-AMS_CHTML-full,Safe'

def local_mathjax() -> Path|None:
    "A MathJax 2 directory on this machine, if there is one."
    for d in filter(None, [os.environ.get('LM_BASICS_MATHJAX'), *MATHJAX_DIRS]):
        if (Path(d)/'MathJax.js').is_file() and (Path(d)/'config'/'TeX-AMS_CHTML-full.js').is_file(): return Path(d)

def copy_mathjax(src:Path, out:Path) -> str:
    "Copy the MathJax files the pages need into `out/mathjax`; returns the (relative) script URL."
    for f in MATHJAX_FILES:
        s, d = src/f, out/'mathjax'/f
        if s.is_dir(): shutil.copytree(s, d, dirs_exist_ok=True)
        elif s.is_file(): d.parent.mkdir(parents=True, exist_ok=True); shutil.copy2(s, d)
    return 'mathjax/MathJax.js' + MATHJAX_CONFIG

def _exporter(mathjax_url:str|None):
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    from traitlets.config import Config
    c = Config()
    c.HTMLExporter.exclude_input_prompt = True
    c.HTMLExporter.exclude_output_prompt = True
    c.TagRemovePreprocessor.enabled = True
    c.TagRemovePreprocessor.remove_cell_tags = {'remove_cell'}
    c.TagRemovePreprocessor.remove_input_tags = {'remove_input'}
    c.TagRemovePreprocessor.remove_all_outputs_tags = {'remove_output'}
    if mathjax_url: c.HTMLExporter.mathjax_url = mathjax_url
    return HTMLExporter(config=c, template_name='lab', template_file='lm_docs.html.j2',
                        extra_loaders=[DictLoader({'lm_docs.html.j2': TEMPLATE})])

_re_math = re.compile(r'\$[^$\n]+\$|\$\$|\\\(|\\\[|\\begin\{')
_re_code = re.compile(r'```.*?```|`[^`\n]*`', re.S)

def has_math(markdown:str) -> bool:
    "Does markdown hold TeX outside its code spans (`$HOME` is not math)?"
    return bool(_re_math.search(_re_code.sub('', markdown)))

def inline_md(text:str) -> str:
    "One line of markdown (a title, a summary) as inline HTML."
    from nbconvert.filters.markdown import markdown2html_mistune
    return markdown2html_mistune(text).strip().removeprefix('<p>').removesuffix('</p>')

def plain(text:str) -> str: return re.sub(r'[`*]', '', text)

_re_heading = re.compile(r'<h([1-6]) id="([^"]*)"(.*?)</h\1>', re.S)

def unique_ids(text:str) -> str:
    "nbconvert names a heading's id after its text; where a section and its `show_doc` share a name, number the later ones."
    seen = {}
    def sub(m):
        hid = m[2]; n = seen.get(hid, 0); seen[hid] = n + 1
        if not n: return m[0]
        new = f'{hid}-{n}'
        return f'<h{m[1]} id="{new}"' + m[3].replace(f'href="#{hid}"', f'href="#{new}"') + f'</h{m[1]}>'
    return _re_heading.sub(sub, text)

def render(exporter, node, site:dict) -> str:
    site = dict(site, has_math=any(c.cell_type == 'markdown' and has_math(c.source) for c in node.cells),
                title_html=inline_md(site['title']), description_html=inline_md(site['description']))
    body, _ = exporter.from_notebook_node(node, resources={'metadata': {'name': f"{plain(site['title'])} – {site['name']}"},
                                                           'site': site})
    return unique_ids(body)

# ---------------------------------------------------------------------------------------------------------------
# Links

_re_href = re.compile(r'''(href|src)=(["'])(.*?)\2''')
_re_id = re.compile(r'''\bid=(["'])(.*?)\1''')
_re_code_nb = re.compile(r'<code>(nbs/)?(\d\d[\w-]*\.ipynb)</code>')

def fix_links(pages:dict[str,str], doc_base:str, nbdev_pages:dict[str,str]) -> dict[str,str]:
    """Point links at the built pages: `NN_name.ipynb[#x]` becomes `NN_name.html[#x]`, and nbdev's doc links
    (`{doc_host}{doc_baseurl}/name.html#sym`, as Quarto names pages) become `NN_name.html#Sym` with the anchor
    matched to the heading id nbconvert gave."""
    ids = {p: set(html.unescape(m[2]) for m in _re_id.finditer(t)) for p, t in pages.items()}
    lower = {p: {i.lower(): i for i in s} for p, s in ids.items()}
    def anchor(page, frag):
        "The heading id nbdev's lower-case anchor names; for `Class.method` (no heading of its own), the class's."
        while frag and frag not in ids.get(page, ()):
            if frag.lower() in lower.get(page, {}): return lower[page][frag.lower()]
            frag = frag.rpartition('.')[0]
        return frag
    def sub(m):
        attr, q, url = m[1], m[2], html.unescape(m[3])
        target = None
        if url.startswith(doc_base):
            rest = url[len(doc_base):].lstrip('/')
            name, _, frag = rest.partition('#')
            page = nbdev_pages.get(name) or (name if name in pages else None)
            if page: target = (page, frag)
        elif not re.match(r'^[a-z][a-z0-9+.-]*:', url, re.I) and not url.startswith(('/', '#')):
            name, _, frag = url.partition('#')
            if name.endswith('.ipynb') and page_name(name) in pages: target = (page_name(name), frag)
        if target is None: return m[0]
        page, frag = target
        frag = anchor(page, frag)
        return f'{attr}={q}{html.escape(page + ("#" + frag if frag else ""))}{q}'
    def code_links(t):  # `02_model.ipynb` or `nbs/02_model.ipynb` in prose, not linked already: a link to that page
        def one(m):
            inside_a = t.rfind('<a ', 0, m.start()) > t.rfind('</a>', 0, m.start())
            return m[0] if inside_a or page_name(m[2]) not in pages else f'<a href="{page_name(m[2])}">{m[0]}</a>'
        return _re_code_nb.sub(one, t)
    return {p: code_links(_re_href.sub(sub, t)) for p, t in pages.items()}

# ---------------------------------------------------------------------------------------------------------------
# The whole site

def _execute_all(nbs_:dict, tmp:Path, timeout:int, jobs:int, verbose:bool) -> dict:
    "Execute the prepared notebooks (in place in `nbs_`), `jobs` at a time, each with its own kernel, cache and IPython dir."
    from concurrent.futures import ThreadPoolExecutor, as_completed
    def run(path):
        t0 = time.perf_counter()
        nbs_[path] = execute_nb(nbs_[path], path.parent, kernel_env(tmp/path.stem), timeout)
        return time.perf_counter() - t0
    times, t0 = {}, time.perf_counter()
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futs = {pool.submit(run, p): p for p in nbs_}
        for f in as_completed(futs):
            path = futs[f]
            try: times[path.name] = f.result()
            except Exception as e:
                for g in futs: g.cancel()
                msg = _re_ansi.sub('', str(e)).strip()
                raise SystemExit(f'{path.name} failed to execute in a fresh kernel:\n{msg}') from None
            if verbose: print(f'executed {path.name:24s} {times[path.name]:6.1f} s', flush=True)
    if verbose: print(f'executed {len(times)} notebooks in {time.perf_counter()-t0:.1f} s ({jobs} at a time)', flush=True)
    return times

_re_ansi = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')

def build(out:Path|str='_site', execute:bool=False, timeout:int=900, mathjax_url:str|None=None,
          nbs:Path=NBS, jobs:int=1, verbose:bool=True) -> dict:
    "Build the site into `out`; returns `{notebook: seconds executing}` (empty without `execute`)."
    from nbdev.config import get_config
    from nbdev.doclinks import _nbpath2html
    # nbdev's advice to keep imports in their own cells is for notebook authors, not for a docs build
    warnings.filterwarnings('ignore', message='Found cells containing imports and other code')
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and (not (out/MARKER).exists() or out in (ROOT, NBS, Path.home())):
        raise SystemExit(f'{out} is not empty and was not made by this script: choose another --out')
    os.chdir(ROOT)  # nbdev reads settings.ini and the doc-link index from the project
    cfg = get_config()
    paths = notebooks(nbs)
    if not paths: raise SystemExit(f'no notebooks in {nbs}')
    titles = {p: nb_title(p) for p in paths}
    nav = [{'href': page_name(p), 'title_html': inline_md(titles[p][0] if p.name != 'index.ipynb' else 'Overview')}
           for p in paths]
    mathjax_src = None if mathjax_url else local_mathjax()
    if mathjax_src: mathjax_url = 'mathjax/MathJax.js' + MATHJAX_CONFIG
    exporter, pages, times = _exporter(mathjax_url), {}, {}
    nbs_ = {p: prepare(p, execute) for p in paths}
    if execute:
        with tempfile.TemporaryDirectory(prefix='lm_basics_docs_') as tmp:
            times = _execute_all(nbs_, Path(tmp), timeout, jobs, verbose)
    for i, path in enumerate(paths):
        nb = finish(nbs_[path], execute)
        fm = getattr(nb, 'frontmatter_', {}) or {}
        title, desc = str(fm.get('title') or titles[path][0]), str(fm.get('description') or titles[path][1])
        site = {'name': cfg.get('title', cfg.lib_name), 'pages': nav, 'current': page_name(path), 'css': SITE_CSS,
                'title': title, 'description': desc,
                'prev': nav[i-1] if i > 0 else None, 'next': nav[i+1] if i+1 < len(nav) else None}
        pages[page_name(path)] = render(exporter, to_nbformat(nb), site)
    doc_base = (cfg.get('doc_host', '') + cfg.get('doc_baseurl', '')).rstrip('/')
    nbdev_pages = {_nbpath2html(p).name: page_name(p) for p in paths}
    pages = fix_links(pages, doc_base, nbdev_pages)
    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    (out/MARKER).write_text('built by tools/build_docs.py; the next build replaces this directory\n')
    for name, text in pages.items(): (out/name).write_text(text, encoding='utf-8')
    (out/SITE_CSS).write_text(CSS, encoding='utf-8')
    if mathjax_src: copy_mathjax(mathjax_src, out)
    if (nbs/'images').is_dir(): shutil.copytree(nbs/'images', out/'images')   # pictures the notebooks' markdown shows
    if verbose:
        print(f'wrote {len(pages)} pages to {out}' + ('' if execute else ' (not executed: add --execute for outputs and figures)'))
        print(f'math: MathJax from {mathjax_src} (copied into the site)' if mathjax_src else
              f'math: MathJax from {mathjax_url or "a CDN"} (offline, equations show as TeX source; apt-get install libjs-mathjax for a local copy)')
    return times

def refresh_quarto_config(nbs:Path=NBS):
    "Write nbs/_quarto.yml (if missing), nbs/nbdev.yml and nbs/sidebar.yml exactly as nbdev 2.4.14's `nbdev_docs` does."
    from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
    os.chdir(ROOT)
    refresh_quarto_yml()
    nbdev_sidebar.__wrapped__(path=str(nbs), force=True)
    print(f'wrote {nbs/"nbdev.yml"} and {nbs/"sidebar.yml"}; {nbs/"_quarto.yml"} is kept once it exists')

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=str(ROOT/'_site'), help='directory to write the site to (replaced; default: _site)')
    p.add_argument('--execute', action='store_true', help='run every notebook in a fresh kernel (outputs and figures)')
    p.add_argument('--timeout', type=int, default=900, help='seconds one cell may run before the build fails')
    p.add_argument('--jobs', type=int, default=1, help='notebooks executed at the same time (each in its own kernel)')
    p.add_argument('--mathjax_url', '--mathjax-url', default=None,
                   help="MathJax 2 script URL (default: a local copy if the machine has one, else nbconvert's CDN)")
    p.add_argument('--quarto_config', '--quarto-config', action='store_true',
                   help="only rewrite nbs/nbdev.yml and nbs/sidebar.yml (and _quarto.yml if missing) as nbdev_docs would")
    a = p.parse_args(argv)
    if a.quarto_config: return refresh_quarto_config()
    t0 = time.perf_counter()
    build(Path(a.out).resolve(), a.execute, a.timeout, a.mathjax_url, jobs=a.jobs)
    print(f'built in {time.perf_counter()-t0:.1f} s')

if __name__ == '__main__': main()
