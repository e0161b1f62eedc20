"""Build the documentation site: nbdev's processing of the notebooks, then Sphinx with myst-nb, furo and its search.

Each notebook goes through nbdev's documentation processors, as `nbdev_docs` runs them before Quarto: directives
applied, `#| hide` and `#| export` cells dropped, a `show_doc` for every exported symbol (run in-process), backticked
names linked to their docs. Nothing else is executed: a page shows the outputs committed in its notebook. The
processed notebooks, named as nbdev names their pages (`02_model.ipynb` -> `model.html`), and the markdown pages of
nbs/ are then built by Sphinx (`docs/conf.py`): myst-nb renders notebooks and outputs, Sphinx indexes every page for
its full-text search, MathJax comes from a local copy (Debian's `libjs-mathjax`), never a CDN.

Usage: python tools/build_site.py [--out _site] [--jobs 2] [--strict]   then: python -m http.server -d _site 8000
With --strict (as CI builds it) a Sphinx warning, a missing local MathJax, or a link or image of the site that leads
nowhere (a file, or an `#anchor` on a page) fails the build.
"""
from __future__ import annotations
import argparse, json, os, re, shutil, sys, tempfile, time, warnings
from html.parser import HTMLParser
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
NBS, DOCS = ROOT/'nbs', ROOT/'docs'
SITE_URL = 'https://lm-basics.github.io/lm_basics/'   # settings.ini's doc_host + doc_baseurl: nbdev's doc links
MARKER = '.lm_basics_site'   # in every site built here: a rebuild only ever replaces a directory this script made

# The navigation, in reading order: the ideas (data, model, optimizer, loop) before the plumbing they run on.
NAV = [('Train a language model', ['01_data', '02_model', '03_optim', '10_train', '06_generate']),
       ('From your text to a model', ['05_tokenize', '14_recipes', '04_checkpoint', '09a_pretrained', '12_export', '11_bench']),
       ('Plumbing', ['07_records', '08_config', '09_runtime', '00_core', '13_cli']),
       ('Reference', ['guide.md', 'guarantees.md', 'bad_inputs.md', 'speed.md', 'recipe_results.md', 'developing.md'])]

MATHJAX_DIRS = ['/usr/share/javascript/mathjax', '/usr/share/nodejs/mathjax']
MATHJAX_FILES = ['MathJax.js', 'config/TeX-AMS_CHTML-full.js', 'config/Safe.js', 'extensions', 'jax/input/TeX',
                 'jax/element', 'jax/output/CommonHTML', 'fonts/HTML-CSS/TeX/woff', 'localization/en']

def page_name(name:str) -> str:
    "The page a notebook or markdown page becomes, named as nbdev names it: `02_model` -> `model`."
    return re.sub(r'^\d+[a-zA-Z0-9]*_', '', Path(name).stem)

def nav_sources(nbs:Path=NBS) -> list[Path]:
    "Every source the navigation lists, in order (notebooks and markdown pages of nbs/)."
    return [Path(nbs)/(n if n.endswith('.md') else n + '.ipynb') for _, names in NAV for n in names]

def local_mathjax() -> Path|None:
    "MathJax 2 on this machine ($LM_BASICS_MATHJAX, or Debian's libjs-mathjax), if there is one."
    for d in filter(None, [os.environ.get('LM_BASICS_MATHJAX'), *MATHJAX_DIRS]):
        if (Path(d)/'MathJax.js').is_file() and (Path(d)/'config'/'TeX-AMS_CHTML-full.js').is_file(): return Path(d)

# ------------------------------------------------------------------------------------------- nbdev's processing
def process(path:str) -> dict:
    "A notebook through nbdev's docs processors (in a worker process); returns the notebook as myst-nb should see it."
    warnings.filterwarnings('ignore')   # nbdev's advice on import cells is for authors, not for a docs build
    os.chdir(ROOT)                      # nbdev reads settings.ini and the doc-link index from the project
    from execnb.nbio import read_nb
    from nbdev.process import NBProcessor
    nb = read_nb(path)
    NBProcessor(nb=nb, procs=_docs_procs()).process()
    fm = getattr(nb, 'frontmatter_', {}) or {}
    cells = [_cell(c) for c in nb.cells if not (c.cell_type == 'raw' and c.source.startswith('---'))]
    if fm.get('title'):
        cells.insert(0, _md(f"# {fm['title']}" + (f"\n\n> {fm['description']}" if fm.get('description') else '')))
    return {'cells': [c for c in cells if c], 'nbformat': 4, 'nbformat_minor': 4, 'metadata': {
        'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
        'language_info': {'name': 'python'}}}

def _docs_procs() -> list:
    """nbdev's docs processors, less the banner of `insert_warning`, with `exec_show_docs` running only what `show_doc`
    needs: exported cells, the hidden set-up cells (their imports name the types in signatures) and `show_doc` calls.
    nbdev also runs a visible cell that imports something; here that is a demo out of its context (the cells above it
    are not run), and maybe a slow one: the page shows its committed outputs."""
    from nbdev.processors import FilterDefaults, insert_warning, exec_show_docs
    class exec_exports(exec_show_docs):
        def __call__(self, cell):
            if cell.cell_type == 'code' and (cell.directives_.keys() & {'export', 'exports', 'exporti', 'exec_doc', 'hide'}
                                             or 'show_doc(' in cell.source): super().__call__(cell)
    return [exec_exports if p is exec_show_docs else p for p in FilterDefaults().procs() if p is not insert_warning]

_re_opt = re.compile(r'^\s*#\|\s*([\w-]+)\s*:\s*(.*?)\s*$')
_re_qattr = re.compile(r'(\]\([^)\s]*\))\{[^}\n]*\}')     # Quarto's [text](url){attrs}: keep the link
_re_nblink = re.compile(r'\]\((?:\./)?(\d+[a-zA-Z0-9]*_[\w-]+)\.ipynb(#[^)\s]*)?\)')

def _md(src:str) -> dict: return {'cell_type': 'markdown', 'metadata': {}, 'source': src}

def _links(md:str) -> str:
    "Links to other notebooks (`02_model.ipynb#x`) point at their pages' sources; Quarto attributes go."
    return _re_qattr.sub(r'\1', _re_nblink.sub(lambda m: f']({page_name(m[1])}.ipynb{m[2] or ""})', md))

def _cell(c) -> dict|None:
    "One processed cell for myst-nb: Quarto options as myst-nb tags, `show_doc` output as markdown."
    if c.cell_type == 'markdown': return _md(_links(c.source))
    if c.cell_type != 'code': return None
    lines, opts = c.source.splitlines(), {}
    while lines and (m := _re_opt.match(lines[0])): opts[m[1]] = m[2].strip('\'"').lower(); lines.pop(0)
    for k, v in (getattr(c, 'directives_', None) or {}).items(): opts.setdefault(k.rstrip(':'), ' '.join(v).lower())
    outs = [dict(o) for o in c.get('outputs', [])]
    if opts.get('output') == 'asis':   # show_doc: its markdown becomes the page's, a heading in the contents
        md = ''.join(''.join(o.get('data', {}).get('text/markdown', '')) for o in outs)
        md = re.sub(r'^---\s*$', '', md, flags=re.M)   # Quarto's rule above each symbol (a docutils transition error)
        return _md(_links(md).strip()) if md.strip() else None
    src = '\n'.join(l for l in lines if not l.lstrip().startswith('#|')).strip('\n')
    tags = [t for k, v, t in [('include', 'false', 'remove-cell'), ('echo', 'false', 'remove-input'),
                              ('output', 'false', 'remove-output')] if opts.get(k) == v]
    if not src.strip() and not outs: return None
    if not src.strip(): tags.append('remove-input')
    for o in outs:
        if 'text/markdown' in o.get('data', {}): o['data']['text/markdown'] = _links(''.join(o['data']['text/markdown']))
    return {'cell_type': 'code', 'metadata': {'tags': tags} if tags else {}, 'source': src, 'outputs': outs,
            'execution_count': c.get('execution_count')}

# ------------------------------------------------------------------------------------------- the source folder
def toctree() -> str:
    "The navigation as hidden toctrees, one per part, appended to the home page."
    return '\n\n'.join(f'```{{toctree}}\n:hidden:\n:caption: {part}\n\n' + '\n'.join(page_name(n) for n in names)
                       + '\n```' for part, names in NAV)

def write_source(src:Path, nbs:Path, jobs:int, verbose:bool, strict:bool=False):
    "The Sphinx source folder: docs/ (conf.py, _static), processed notebooks, markdown pages, images, MathJax."
    shutil.copytree(DOCS, src, dirs_exist_ok=True)
    if (nbs/'images').is_dir(): shutil.copytree(nbs/'images', src/'images')
    if mj := local_mathjax():
        for f in MATHJAX_FILES:
            s, d = mj/f, src/'_static'/'mathjax'/f
            if s.is_dir(): shutil.copytree(s, d, dirs_exist_ok=True)
            elif s.is_file(): d.parent.mkdir(parents=True, exist_ok=True); shutil.copy2(s, d)
    elif strict: raise SystemExit('no local MathJax (apt-get install libjs-mathjax, or set LM_BASICS_MATHJAX): '
                                  'equations would show as TeX source')
    elif verbose: print('warning: no local MathJax (apt-get install libjs-mathjax): equations will show as TeX source')
    sources = nav_sources(nbs)
    missing = [p.name for p in sources if not p.is_file()]
    if missing: raise SystemExit(f'tools/build_site.py NAV lists pages that {nbs} does not have: {", ".join(missing)}')
    unlisted = sorted(p.name for p in nbs.glob('[0-9]*.ipynb') if p not in sources)
    if unlisted: raise SystemExit(f'notebooks missing from the navigation (NAV in tools/build_site.py): {", ".join(unlisted)}')
    t0 = time.perf_counter()
    sys.path.insert(0, str(Path(__file__).parent))
    import build_site   # workers find `process` by its module's name, which a script run as __main__ lacks
    notebooks = [nbs/'index.ipynb'] + [p for p in sources if p.suffix == '.ipynb']
    with ProcessPoolExecutor(max(1, jobs)) as pool: done = dict(zip(notebooks, pool.map(build_site.process, map(str, notebooks))))
    if verbose: print(f'nbdev processed {len(notebooks)} notebooks in {time.perf_counter()-t0:.1f} s')
    done[nbs/'index.ipynb']['cells'].append(_md(toctree()))
    for p, nb in done.items(): (src/f'{page_name(p.name)}.ipynb').write_text(json.dumps(nb, indent=1), encoding='utf-8')
    for p in sources:
        if p.suffix == '.md': (src/f'{page_name(p.name)}.md').write_text(_links(p.read_text(encoding='utf-8')), encoding='utf-8')

# ------------------------------------------------------------------------------------------- after Sphinx
_re_href = re.compile(r'href="' + re.escape(SITE_URL) + r'([\w.-]+\.html)?(?:#([^"]*))?"')
_re_id = re.compile(r'\bid="([^"]+)"')

def local_links(out:Path):
    """nbdev's doc links and the README's links to the site (`SITE_URL/model.html#transformerlm`) point at the
    built pages, the anchor matched to the id Sphinx gave the heading (`TrainStep.run` -> `trainstep-run`)."""
    from docutils.nodes import make_id
    pages = {p.name: p.read_text(encoding='utf-8') for p in out.glob('*.html')}
    ids = {n: set(_re_id.findall(t)) for n, t in pages.items()}
    def sub(m):
        page, frag = m[1] or 'index.html', m[2] or ''
        if page not in pages: return m[0]
        while frag and frag not in ids[page] and make_id(frag) not in ids[page]: frag = frag.rpartition('.')[0]
        frag = frag if frag in ids[page] else make_id(frag) if frag else ''
        return f'href="{page}' + (f'#{frag}' if frag else '') + '"'
    for n, t in pages.items():
        new = _re_href.sub(sub, t)
        if new != t: (out/n).write_text(new, encoding='utf-8')

class _Refs(HTMLParser):
    "The ids of a page and the links (`href`) and sources (`src`) it refers to."
    def __init__(self): super().__init__(); self.ids, self.refs = set(), []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get('id'): self.ids.add(a['id'])
        self.refs += [a[k] for k in ('href', 'src') if a.get(k)]

def broken_links(out:Path) -> list[str]:
    "Every link, image or script of the site at `out` that leads nowhere: `page.html: target (why)`."
    pages = {}
    for p in out.rglob('*.html'):
        pages[p] = r = _Refs(); r.feed(p.read_text(encoding='utf-8'))
    bad = []
    for p, r in pages.items():
        for ref in r.refs:
            u, name = urlsplit(ref), p.relative_to(out)
            if ref.startswith(SITE_URL): bad.append(f'{name}: {ref} (a page of the published site this one lacks)')
            if u.scheme or u.netloc or ref.startswith(('mailto:', 'javascript:', 'data:')): continue
            target = (p.parent/unquote(u.path)).resolve() if u.path else p
            if not target.exists(): bad.append(f'{name}: {ref} (no such file)')
            elif u.fragment and target in pages and unquote(u.fragment) not in pages[target].ids:
                bad.append(f'{name}: {ref} (no #{unquote(u.fragment)} there)')
    return bad

def build(out:Path|str='_site', jobs:int=2, nbs:Path|str=NBS, verbose:bool=True, strict:bool=False) -> float:
    "Build the site from the notebooks and pages in `nbs` into `out` (replaced); returns the seconds it took."
    from sphinx.cmd.build import build_main
    t0, out, nbs = time.perf_counter(), Path(out).resolve(), Path(nbs).resolve()
    if out.exists() and any(out.iterdir()) and (not (out/MARKER).exists() or out in (ROOT, NBS, DOCS, Path.home())):
        raise SystemExit(f'{out} is not empty and was not made by this script: choose another --out')
    os.environ.setdefault('IPYTHONDIR', tempfile.mkdtemp(prefix='lm_basics_ipython_'))
    os.environ.setdefault('MPLBACKEND', 'Agg')
    with tempfile.TemporaryDirectory(prefix='lm_basics_site_') as tmp:
        src, html = Path(tmp)/'src', Path(tmp)/'html'
        write_source(src, nbs, jobs, verbose, strict)
        args = ['-b', 'html', '-j', str(max(1, jobs)), '-d', str(Path(tmp)/'doctrees'), '-q'] + ([] if verbose else ['-Q'])
        if strict: args += ['-W', '--keep-going']   # a warning is an error
        if rc := build_main([*args, str(src), str(html)]): raise SystemExit(f'sphinx-build failed (exit {rc})')
        local_links(html)
        if strict and (bad := broken_links(html)):
            raise SystemExit(f'{len(bad)} links of the site lead nowhere:\n' + '\n'.join(bad[:50]))
        (html/MARKER).write_text('built by tools/build_site.py; the next build replaces this directory\n')
        if out.exists(): shutil.rmtree(out)
        shutil.move(str(html), str(out))
    secs = time.perf_counter() - t0
    if verbose: print(f'built {len(list(out.glob("*.html")))} pages into {out} in {secs:.1f} s')
    return secs

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default=str(ROOT/'_site'), help='directory to write the site to (replaced; default: _site)')
    p.add_argument('--jobs', type=int, default=2, help='processes for nbdev and Sphinx (default: 2)')
    p.add_argument('--nbs', default=str(NBS), help="the notebooks and pages to build (default: the project's nbs/)")
    p.add_argument('--strict', action='store_true', help='fail on a Sphinx warning, a missing local MathJax or a broken link')
    a = p.parse_args()
    build(a.out, a.jobs, a.nbs, strict=a.strict)
