"""The docs site as a reader meets it.

`python tools/build_docs.py --execute` builds the site into a temporary directory (every notebook run top to bottom
in a fresh kernel), a thread serves it on 127.0.0.1, and headless Chromium loads every page. For each page we check
what a reader would look for: its title, the sidebar in notebook order, an API heading with signature and parameter
table for every function and class its module exports, the figures its notebook draws, its equations typeset (or
their TeX source, without a local MathJax), and that every internal link (and `#anchor`) leads somewhere. Screenshots of the index and the model page are saved to `$LM_BASICS_ARTIFACTS`
(or a temporary directory), with the build log and the time each notebook took to execute. To check a site you
built already instead of building one, set `LM_BASICS_DOCS_SITE` to its directory.

Chromium is Debian's `chromium` package, with `libjs-mathjax` for the equations; `.ci/run` installs both. Without
Chromium the tests that need it skip (and fail in CI, LM_BASICS_CI=1); the tests never install anything. The Quarto
configuration nbdev needs (`nbs/_quarto.yml`, `nbdev.yml`, `sidebar.yml`, `styles.css`) is checked against what nbdev
2.4.14 generates.
"""
from __future__ import annotations
import base64, contextlib, functools, http.server, importlib, importlib.util, inspect, io, json, os, re, shutil
import struct, subprocess, sys, tempfile, threading, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
sys.path.insert(0, str(ROOT/'tools'))
import build_docs  # noqa: E402

_missing = [m for m in ('nbconvert', 'nbclient', 'bs4') if importlib.util.find_spec(m) is None]
if _missing:  # a failure, not a skip: the docs build is part of the project
    raise ImportError(f'{", ".join(_missing)} missing: the docs build needs nbconvert and nbclient (beautifulsoup4 comes '
                      'with nbconvert), from settings.ini dev_requirements: pip install -e ".[dev]"')
import bs4  # noqa: E402

NOTEBOOKS = build_docs.notebooks()
PAGES = [build_docs.page_name(p) for p in NOTEBOOKS]
BUILD_TIMEOUT = 900   # seconds for the whole build (executing every notebook); 1-3 minutes on a busy 2-core CPU
CHROME_TIMEOUT = 60   # seconds for one page load
CHROME_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                '--disable-component-update', '--disable-sync', '--no-first-run',
                '--virtual-time-budget=10000']  # let scripts (MathJax typesetting) finish before the DOM or screenshot


# ---------------------------------------------------------------------------------------------------- Chromium
def _chromium() -> str|None:
    "Path to headless Chromium (Debian's `chromium`, which `.ci/run` installs with libjs-mathjax), or None."
    return shutil.which('chromium') or ('/usr/bin/chromium' if Path('/usr/bin/chromium').exists() else None)


def chrome(exe:str, url:str, *args:str) -> str:
    "Run headless Chromium on `url` with a fresh profile; returns its stdout (the DOM, with --dump-dom)."
    with tempfile.TemporaryDirectory(prefix='lm_basics_chromium_') as profile:
        r = subprocess.run([exe, *CHROME_FLAGS, f'--user-data-dir={profile}', *args, url],
                           capture_output=True, text=True, timeout=CHROME_TIMEOUT)
    assert r.returncode == 0, f'chromium failed on {url}:\n{r.stderr[-2000:]}'
    return r.stdout


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def artifacts(tmp_path_factory) -> Path:
    d = Path(os.environ['LM_BASICS_ARTIFACTS']) if os.environ.get('LM_BASICS_ARTIFACTS') else tmp_path_factory.mktemp('artifacts')
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope='module')
def browser(lm) -> str:
    "Chromium; missing, the tests that need it skip (fail in CI, where .ci/run installs it: apt-get install chromium libjs-mathjax)."
    return _chromium() or lm.missing_tool('headless Chromium is needed: install the Debian package `chromium` (apt-get install -y chromium libjs-mathjax)')


@pytest.fixture(scope='module')
def site(browser, tmp_path_factory, artifacts) -> Path:
    "The site, built by the documented command into a temporary directory (after the browser: no build to skip)."
    if os.environ.get('LM_BASICS_DOCS_SITE'): return Path(os.environ['LM_BASICS_DOCS_SITE'])  # check a site built already
    out = tmp_path_factory.mktemp('site')/'_site'
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'build_docs.py'), '--out', str(out), '--execute', '--jobs', '2'],
                       cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    (artifacts/'docs_build.log').write_text(r.stdout + r.stderr)
    assert r.returncode == 0, f'build_docs.py failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}'
    times = {m[1]: float(m[2]) for m in re.finditer(r'^executed (\S+\.ipynb)\s+([\d.]+) s$', r.stdout, re.M)}
    (artifacts/'docs_execution_times.json').write_text(json.dumps(
        {'seconds_per_notebook': times, 'build_seconds': round(time.perf_counter() - t0, 1)}, indent=1))
    assert set(times) == {p.name for p in NOTEBOOKS}, f'not every notebook was executed: {r.stdout}'
    return out


@pytest.fixture(scope='module')
def server(site):
    "The site served over HTTP on a free port of 127.0.0.1, in a thread."
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(site)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True); t.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown(); httpd.server_close(); t.join(5)


@pytest.fixture(scope='module')
def doms(browser, server, lm) -> dict:
    "Each page as Chromium built it (`--dump-dom`), parsed; two pages at a time."
    html = lm.in_parallel(lambda p: chrome(browser, f'{server}/{p}', '--dump-dom'), PAGES)
    return {p: bs4.BeautifulSoup(h, 'html.parser') for p, h in zip(PAGES, html)}


# ---------------------------------------------------------------------------------------------------- what a notebook promises
def nb_source(nb:Path) -> list[dict]: return json.loads(nb.read_text(encoding='utf-8'))['cells']

def module_of(nb:Path):
    "The module a notebook exports (`#| default_exp name`), imported; None for the index."
    for c in nb_source(nb):
        if c['cell_type'] == 'code' and (m := re.search(r'^#\|\s*default_exp\s+(\S+)', ''.join(c['source']), re.M)):
            return importlib.import_module(f'lm_basics.{m[1]}')

def exported_api(mod) -> list[str]:
    "Functions and classes a module exports (its `__all__`), defined there: each gets a `show_doc`."
    return [n for n in getattr(mod, '__all__', []) if (inspect.isfunction(o := getattr(mod, n)) or inspect.isclass(o))
            and o.__module__ == mod.__name__]

def documented_params(obj) -> list[str]:
    "Parameters with a docments comment, the rows a reader expects in the table."
    from fastcore.docments import docments
    return [k for k, v in docments(obj).items() if v and k not in ('self', 'return')]

_re_plot = re.compile(r'\b(plt\.|\.plot\(|\.imshow\(|\.hist\(|\.scatter\()')
_skip = re.compile(r"^#\|\s*(slow|notest|eval:\s*false|export)\b", re.M)   # cells the docs do not run, and definitions (which draw nothing)

def plots(nb:Path) -> bool:
    "Does a cell that runs for the docs draw a figure?"
    return any(c['cell_type'] == 'code' and _re_plot.search(s := ''.join(c['source'])) and not _skip.search(s)
               for c in nb_source(nb))


def has_math(nb:Path) -> bool:
    return any(c['cell_type'] == 'markdown' and build_docs.has_math(''.join(c['source'])) for c in nb_source(nb))

def words(el) -> str: return ' '.join(el.get_text().split())

def api_doc(dom, name:str):
    "The `show_doc` output for `name`: the rendered output that holds a heading reading `name`."
    for h in dom.select('.jp-OutputArea-output h2, .jp-OutputArea-output h3, .jp-OutputArea-output h4'):
        if words(h).rstrip('¶') == name: return h.find_parent(class_='jp-OutputArea-output')

def table_rows(doc) -> list[str]:
    "First-column texts of the parameter table in a `show_doc` output."
    table = doc.find('table')
    return [words(tr.find('td')) for tr in table.select('tbody tr')] if table else []


# ---------------------------------------------------------------------------------------------------- tests
def test_quarto_files_are_nbdevs(monkeypatch):
    "The files `nbdev_docs`/`nbdev_preview` need are committed, as nbdev 2.4.14 writes them."
    from nbdev import quarto
    from nbdev.config import get_config
    monkeypatch.chdir(ROOT)
    assert (NBS/'_quarto.yml').read_text().strip() == quarto._quarto_yml.strip()
    cfg = get_config()
    vals = {k: cfg[k] for k in ['title', 'description', 'branch', 'git_url', 'doc_host', 'doc_baseurl']}
    assert (NBS/'nbdev.yml').read_text() == quarto._nbdev_yml.format(doc_path=cfg.doc_path.name, **vals), \
        'nbs/nbdev.yml is out of step with settings.ini: run python tools/build_docs.py --quarto_config'
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf): quarto.nbdev_sidebar.__wrapped__(path=str(NBS), printit=True, force=True)
    assert (NBS/'sidebar.yml').read_text().strip() == buf.getvalue().strip(), \
        'nbs/sidebar.yml does not list the notebooks: run python tools/build_docs.py --quarto_config'
    css = (NBS/'styles.css').read_text()
    assert '.cell-output' in css and 'div.description' in css


def test_every_notebook_is_a_page(site, doms):
    assert sorted(p.name for p in site.glob('*.html')) == sorted(PAGES)
    assert PAGES[0] == 'index.html'
    for page, dom in doms.items():
        nav = [a['href'] for a in dom.select('nav.lm-sidebar li a')]
        assert nav == PAGES, f'{page}: sidebar not in notebook order: {nav}'
        assert dom.select_one('nav.lm-sidebar li.active a')['href'] == page


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_page_shows_title_api_and_figures(nb, doms, site):
    dom = doms[build_docs.page_name(nb)]
    for img in dom.select('main img'):   # pictures from files (the README's loss plot) are in the site
        if not img['src'].startswith('data:'):
            f = site/img['src']
            assert f.is_file() and f.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', f'{nb.name}: image {img["src"]} is not in the site'
    title, desc = build_docs.nb_title(nb)
    h1 = dom.select_one('main h1.title')
    assert h1 is not None and words(h1) == build_docs.plain(title)
    assert build_docs.plain(title) in dom.title.get_text()
    if desc: assert words(dom.select_one('main p.description')) == build_docs.plain(desc)
    text = dom.select_one('main').get_text()
    assert not re.search(r'#\|\s*(export|hide|default_exp)', text), 'nbdev directives leaked into the page'
    assert 'nbdev_export()' not in text and 'show_doc(' not in text
    assert not dom.select('.jp-OutputArea-error'), 'an error output was rendered'
    assert len(text) > 500, 'the page has almost no text'

    mod = module_of(nb)
    for name in (exported_api(mod) if mod else []):
        doc = api_doc(dom, name)
        assert doc is not None, f'{nb.name}: no API docs (show_doc heading) for {name}'
        sig = doc.find('pre')
        assert sig is not None and re.search(rf'\b(def|class)\s+{name}\b', sig.get_text()), f'{name}: no signature'
        if params := documented_params(getattr(mod, name)):
            rows = table_rows(doc)
            assert rows, f'{name}: no parameter table'
            assert [p for p in params if p not in rows] == [], f'{name}: parameters missing from the table {rows}'

    imgs = dom.select('main img')
    if plots(nb):
        assert imgs, f'{nb.name} draws a figure but the page shows none'
        for img in imgs:
            assert img['src'].startswith('data:image/png;base64,'), 'figures are embedded as PNG'
            png = base64.b64decode(img['src'].split(',', 1)[1])
            w, h = struct.unpack('>II', png[16:24])
            assert png[:8] == b'\x89PNG\r\n\x1a\n' and w > 100 and h > 50


@pytest.mark.parametrize('nb', [p for p in NOTEBOOKS if has_math(p)], ids=lambda p: p.stem)
def test_equations(nb, site, doms):
    "Equations are typeset by the MathJax copied into the site; with no local MathJax their TeX source still shows."
    dom = doms[build_docs.page_name(nb)]
    text = dom.select_one('main').get_text()
    if (site/'mathjax'/'MathJax.js').is_file():
        assert dom.select('.MathJax_CHTML, .mjx-chtml'), 'MathJax did not typeset the equations'
        assert not dom.select('.mjx-merror, .MathJax_Error'), 'MathJax reported an error'
        assert '$$' not in text and '\\frac' not in text
    else:
        assert '$' in text, 'the TeX source of the equations is missing'


def test_known_pages_carry_their_api(doms):
    "The examples a reader would look up first (guards against the generic checks matching nothing)."
    for page, names in {'01_data.html': ['get_batch'], '02_model.html': ['TransformerLM', 'RMSNorm'],
                        '03_optim.html': ['cosine_lr'], '08_config.html': ['TrainConfig'], '10_train.html': ['TrainStep', 'train']}.items():
        for name in names: assert api_doc(doms[page], name), f'{page}: {name}'
    assert table_rows(api_doc(doms['01_data.html'], 'get_batch'))[:3] == ['data', 'batch_size', 'context_length']
    assert 'd_model' in table_rows(api_doc(doms['02_model.html'], 'TransformerLM'))
    assert plots(NBS/'03_optim.ipynb') and doms['03_optim.html'].select('main img'), 'the learning-rate plot'


def test_internal_links_resolve(site, doms):
    "Every link to a local page (with or without #anchor) lands on a built page and an existing anchor."
    ids = {p: {el['id'] for el in dom.find_all(id=True)} for p, dom in doms.items()}
    checked, bad = 0, []
    for page, dom in doms.items():
        for el in dom.select('a[href], link[href]'):
            url = el['href']
            if re.match(r'^[a-z][a-z0-9+.-]*:|^//', url, re.I): continue  # another site
            path, _, frag = url.partition('#')
            target = path or page
            checked += 1
            if not (site/target).is_file(): bad.append(f'{page}: {url} (no such file)')
            elif frag and target.endswith('.html') and frag not in ids.get(target, set()):
                bad.append(f'{page}: {url} (no #{frag} there)')
    assert not bad, '\n'.join(bad)
    assert checked > 10 * len(PAGES)
    # nbdev's doc links (backticked names in prose) point at the local API headings, not the published site
    hrefs = [a['href'] for a in doms['10_train.html'].select('main a[href]')]
    assert any(h.startswith('02_model.html#') or h.startswith('01_data.html#') for h in hrefs)
    assert not [h for h in hrefs if h.endswith('.ipynb') or '.ipynb#' in h]


def test_screenshots(browser, server, artifacts):
    "The index and the model page as a reader sees them, saved as test artifacts."
    for page in ('index.html', '02_model.html'):
        png = artifacts/f'docs_{Path(page).stem}.png'
        png.unlink(missing_ok=True)
        chrome(browser, f'{server}/{page}', f'--screenshot={png}', '--window-size=1280,2000', '--hide-scrollbars')
        data = png.read_bytes()
        assert data[:8] == b'\x89PNG\r\n\x1a\n' and struct.unpack('>II', data[16:24]) == (1280, 2000)
        assert len(data) > 30_000, f'{png} looks blank ({len(data)} bytes)'


def test_quick_build_without_execute(tmp_path):
    "`build_docs.py` without --execute (seconds, no outputs) renders every page too, with the README's picture."
    out = tmp_path/'_site'
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'build_docs.py'), '--out', str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f'{r.stdout[-3000:]}\n{r.stderr[-5000:]}'
    assert sorted(p.name for p in out.glob('*.html')) == sorted(PAGES)
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', (out/'index.html').read_text())
    assert 'images/demo_loss.png' in srcs and (out/'images'/'demo_loss.png').read_bytes()[:4] == b'\x89PNG'
