"""The documentation site as a reader meets it, in headless Chromium.

The site is built once, by the documented command (`tools/build_site.py --strict`), into a temporary directory from
the notebooks as committed: nothing is executed, a page shows its notebook's committed outputs. A thread serves it on
127.0.0.1 and one headless Chromium, driven over the DevTools protocol's pipe, loads every page and asks it what a
reader would see: the navigation in reading order, the search finding the right chapter, every equation typeset by
the local MathJax with no raw `$...$` left, every image loaded, every internal link (and `#anchor`) leading
somewhere, and nothing fetched from the network.

Chromium and MathJax are Debian's `chromium` (or Chrome) and `libjs-mathjax`, which `.ci/run` installs: without them
these tests skip, and fail in CI (LM_BASICS_CI=1). Sphinx, myst-nb and furo are dev requirements: without them the file fails.
To check a site you built already, set `LM_BASICS_DOCS_SITE` to its directory.
"""
from __future__ import annotations
import fcntl, functools, http.server, importlib, importlib.util, inspect, json, os, re, shutil, subprocess, sys
import tempfile, threading, time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
sys.path.insert(0, str(ROOT/'tools'))
import build_site  # noqa: E402

_missing = [m for m in ('sphinx', 'myst_nb', 'furo') if importlib.util.find_spec(m) is None]
if _missing:  # a failure, not a skip: the site is part of the project
    raise ImportError(f'{", ".join(_missing)} missing: the docs site needs the dev requirements (pip install -e ".[dev]")')

CHAPTERS = [n for _, names in build_site.NAV for n in names]
NAV_PAGES = [build_site.page_name(n) + '.html' for n in CHAPTERS]
BUILD_TIMEOUT = 600           # seconds: about 25 s here, more on a busy 2-core machine
PAGE_TIMEOUT = 60             # seconds for one page to load and typeset
SEARCHES = {'rotary': 'model.html', 'Muon': 'optim.html', 'checkpoint': 'checkpoint.html', 'bits per byte': 'train.html'}


# ---------------------------------------------------------------------------------------------------- Chromium over a pipe
class CDPError(RuntimeError): pass

class Chromium:
    """Headless Chromium spoken to over `--remote-debugging-pipe` (fd 3 in, fd 4 out, NUL-terminated JSON): the
    DevTools protocol without a port or a WebSocket library."""
    FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
             '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-extensions',
             '--disable-default-apps', '--mute-audio', '--remote-debugging-pipe']

    def __init__(self, exe:str, timeout:float=PAGE_TIMEOUT):
        self.timeout, self._id, self._answers, self._events, self._gone = timeout, 0, {}, [], False
        self._cv = threading.Condition()
        self._profile = tempfile.TemporaryDirectory(prefix='lm_basics_chromium_')
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        def fds():  # the child's fds 3 and 4 become the pipe's ends (first moved out of 3's and 4's way)
            r, w = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3); os.dup2(w, 4)
        self.proc = subprocess.Popen([exe, *self.FLAGS, f'--user-data-dir={self._profile.name}', 'about:blank'],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=fds, close_fds=False, start_new_session=True)
        os.close(cmd_r); os.close(out_w)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b''
        while chunk := os.read(self._out_r, 1 << 16):
            *msgs, buf = (buf + chunk).split(b'\0')
            with self._cv:
                for d in map(json.loads, msgs):
                    if 'id' in d: self._answers[d['id']] = d
                    else: self._events.append(d)
                self._cv.notify_all()
        with self._cv: self._gone = True; self._cv.notify_all()

    def _wait(self, found, what:str, timeout:float|None):
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cv:
            while (r := found()) is None:
                if self._gone: raise CDPError(f'{what}: Chromium exited')
                if (left := deadline - time.monotonic()) <= 0: raise CDPError(f'{what}: nothing within {timeout or self.timeout} s')
                self._cv.wait(left)
            return r

    def send(self, method:str, params:dict|None=None, session:str|None=None, timeout:float|None=None) -> dict:
        with self._cv: self._id += 1; i = self._id
        os.write(self._cmd_w, json.dumps({'id': i, 'method': method, 'params': params or {},
                                          **({'sessionId': session} if session else {})}).encode() + b'\0')
        d = self._wait(lambda: self._answers.pop(i, None), method, timeout)
        if 'error' in d: raise CDPError(f'{method}: {d["error"]}')
        return d.get('result', {})

    def event(self, method:str, session:str, timeout:float|None=None) -> dict:
        "Wait for (and take) the first event `method` of `session`."
        def found():
            for e in self._events:
                if e['method'] == method and e.get('sessionId') == session: self._events.remove(e); return e['params']
        return self._wait(found, method, timeout)

    def page(self) -> 'Page':
        target = self.send('Target.createTarget', {'url': 'about:blank'})['targetId']
        session = self.send('Target.attachToTarget', {'targetId': target, 'flatten': True})['sessionId']
        for m in ('Page.enable', 'Runtime.enable', 'Network.enable'): self.send(m, session=session)
        return Page(self, session)

    def close(self):
        try: self.send('Browser.close', timeout=10)
        except (CDPError, OSError): pass
        try: self.proc.wait(15)
        except subprocess.TimeoutExpired: os.killpg(self.proc.pid, 9); self.proc.wait()
        os.close(self._cmd_w); self._profile.cleanup()

class Page:
    "A tab: `goto` a URL (waits for its load event), evaluate JavaScript (promises awaited), list what it requested."
    def __init__(self, browser:Chromium, session:str): self.b, self.session = browser, session

    def goto(self, url:str):
        with self.b._cv: self.b._events = [e for e in self.b._events if e.get('sessionId') != self.session]
        if err := self.b.send('Page.navigate', {'url': url}, self.session).get('errorText'): raise CDPError(f'{url}: {err}')
        self.b.event('Page.loadEventFired', self.session)

    def js(self, expression:str):
        r = self.b.send('Runtime.evaluate', {'expression': expression, 'awaitPromise': True, 'returnByValue': True,
                                             'timeout': 1000 * self.b.timeout}, self.session)
        if 'exceptionDetails' in r: raise CDPError(r['exceptionDetails'].get('exception', {}).get('description', str(r)))
        return r['result'].get('value')

    def requests(self) -> list[str]:
        with self.b._cv:
            return [e['params']['request']['url'] for e in self.b._events
                    if e['method'] == 'Network.requestWillBeSent' and e.get('sessionId') == self.session]

# What a page shows once MathJax has typeset it and its images have loaded (lazy ones are made eager).
PAGE_INFO = r'''(async () => {
  if (window.MathJax && MathJax.Hub) await new Promise(r => MathJax.Hub.Queue(r));
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => i.complete ? 0 : new Promise(r => { i.onload = i.onerror = r; })));
  const article = document.querySelector('article[role=main]') || document.body;
  const prose = article.cloneNode(true);   // the text a reader sees outside code and typeset maths
  prose.querySelectorAll('pre, code, script, style, .math, .MathJax, .MathJax_CHTML, .MathJax_Preview, .MathJax_Display')
       .forEach(e => e.remove());
  return {
    title: document.title,
    h1: (article.querySelector('h1') || {}).textContent || '',
    headings: [...article.querySelectorAll('h1, h2, h3, h4')].map(h => h.textContent.replace(/[#¶]\s*$/, '').trim()),
    signatures: [...article.querySelectorAll('div.highlight pre')].map(p => p.textContent).filter(t => /^(def|class) /.test(t)),
    nav: [...document.querySelectorAll('.sidebar-tree a.reference')].map(a => a.getAttribute('href')),
    math: article.querySelectorAll('span.math, div.math').length,
    typeset: article.querySelectorAll('.MathJax_CHTML').length,
    mathErrors: article.querySelectorAll('.MathJax_Error, .mjx-merror, merror').length,
    prose: prose.textContent,
    text: article.innerText,
    cells: [...article.querySelectorAll('div.cell')].map(c => c.textContent).join('\n'),
    images: imgs.map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0, width: i.naturalWidth,
                            output: !!i.closest('.cell_output')})),
    outputs: article.querySelectorAll('.cell_output').length,
    links: [...document.querySelectorAll('a[href], link[href]')].map(a => a.href),
    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
  };
})()'''

# Sphinx's search writes its summary ("Search finished, found ..." or "did not match") once it is done: poll for it.
SEARCH_RESULTS = r'''(async () => {
  const deadline = Date.now() + %d;
  while (Date.now() < deadline) {
    const s = document.querySelector('#search-results .search-summary');
    if (s && s.textContent.trim()) break;
    await new Promise(r => setTimeout(r, 100));
  }
  return {summary: (document.querySelector('#search-results .search-summary') || {}).textContent || '',
          hits: [...document.querySelectorAll('#search-results ul.search > li > a')].map(a => a.getAttribute('href'))};
})()''' % (1000 * (PAGE_TIMEOUT - 5))


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def chromium(lm) -> str:
    "Debian's chromium, or Chrome (GitHub's runners have it), or the browser named by $LM_BASICS_CHROMIUM."
    names = [os.environ.get('LM_BASICS_CHROMIUM'), 'chromium', 'google-chrome', 'google-chrome-stable', 'chromium-browser']
    exe = next((e for e in map(shutil.which, filter(None, names)) if e), None)
    return exe or lm.missing_tool('headless Chromium is needed: apt-get install -y chromium libjs-mathjax')

@pytest.fixture(scope='module')
def mathjax(lm) -> Path:
    return build_site.local_mathjax() or lm.missing_tool('a local MathJax is needed: apt-get install -y libjs-mathjax')

@pytest.fixture(scope='module')
def site(chromium, mathjax, tmp_path_factory) -> Path:
    "The site, built by the documented command (`--strict`: no warning, no broken link) from the committed notebooks."
    if os.environ.get('LM_BASICS_DOCS_SITE'): return Path(os.environ['LM_BASICS_DOCS_SITE'])
    out = tmp_path_factory.mktemp('docs')/'_site'
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'build_site.py'), '--out', str(out), '--strict'],
                       cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert r.returncode == 0, f'build_site.py --strict failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}'
    print(f'site built in {time.perf_counter() - t0:.1f} s')
    return out

@pytest.fixture(scope='module')
def server(site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(site)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True); t.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown(); httpd.server_close(); t.join(5)

@pytest.fixture(scope='module')
def tab(chromium, server) -> Page:
    b = Chromium(chromium)
    try: yield b.page()
    finally: b.close()

@pytest.fixture(scope='module')
def pages(tab, server, site) -> dict:
    "Every page of the site as Chromium shows it, with the URLs it requested."
    out = {}
    for p in sorted(site.glob('*.html')):
        tab.goto(f'{server}/{p.name}')
        out[p.name] = tab.js(PAGE_INFO) | {'requests': tab.requests()}
    return out


# ---------------------------------------------------------------------------------------------------- what a reader sees
def test_every_chapter_is_a_page_in_reading_order(pages):
    "Every notebook and page of the navigation is a page; each page's sidebar lists them in NAV's order."
    numbered = sorted(p.stem for p in NBS.glob('[0-9]*.ipynb'))
    assert sorted(n for n in CHAPTERS if not n.endswith('.md')) == numbered, 'a notebook is missing from NAV'
    assert set(NAV_PAGES) | {'index.html'} <= set(pages)
    assert NAV_PAGES[:4] == ['data.html', 'model.html', 'optim.html', 'train.html'], 'the ideas come first'
    for name, p in pages.items():
        nav = [h if h not in ('#', '') else name for h in p['nav']]
        assert nav == NAV_PAGES, f'{name}: sidebar {nav}'
        assert len(p['text']) > 300 or name in ('search.html', 'genindex.html'), f'{name} is almost empty'
        leak = re.search(r'#\|\s*(export|hide|default_exp)|nbdev_export\(|show_doc\(', p['cells'])
        assert not leak, f'{name}: nbdev directives or calls in its cells: {leak}'

def test_home_page_maps_the_chapters_in_order(pages):
    "The home page (the README) teaches what lm_basics is, and its chapter map follows the navigation."
    home = pages['index.html']
    assert home['h1'].strip('#¶ ') == 'lm_basics'
    table = [urlsplit(u).path.rsplit('/', 1)[-1] for u in home['links']]
    chapters = [p for p in table if p in NAV_PAGES[:len([n for n in CHAPTERS if not n.endswith('.md')])]]
    first = list(dict.fromkeys(chapters))
    assert first == [p for p in NAV_PAGES if p in first] and len(first) == 16, first

@pytest.mark.parametrize('query', SEARCHES)
def test_search_finds_the_chapter(query, tab, server, pages):
    tab.goto(f'{server}/search.html?q={query.replace(" ", "+")}')
    r = tab.js(SEARCH_RESULTS)
    hits = list(dict.fromkeys(h.split('#')[0] for h in r['hits']))
    assert SEARCHES[query] in hits, f'{query!r}: {r["summary"]} {hits}'
    if ' ' not in query: assert SEARCHES[query] in hits[:3], f'{query!r}: {SEARCHES[query]} ranked low in {hits}'
    assert len(hits) < len(pages) - 4, f'{query!r} matches almost every page: {hits}'
    assert all(h in pages for h in hits), hits

def test_maths_is_typeset(pages):
    "Every equation is typeset by the local MathJax, none reports an error, and no raw TeX is left in the prose."
    with_math = {n for n, p in pages.items() if p['math']}
    assert {'model.html', 'optim.html', 'train.html'} <= with_math, sorted(with_math)
    for name, p in pages.items():
        assert p['typeset'] == p['math'], f'{name}: {p["math"]} equations, {p["typeset"]} typeset'
        assert not p['mathErrors'], f'{name}: MathJax errors'
        raw = re.findall(r'\$\$|\$[^\s$][^$\n]*\$|\\\(|\\\[|\\frac|\\begin\{', p['prose'])
        assert not raw, f'{name}: raw TeX in the page: {raw[:5]}'

def committed_outputs(nb:str) -> tuple[int, int]:
    "How many code cells of notebook `nb` carry a committed output, and how many of those hold an image."
    cells = [c for c in json.loads((NBS/f'{nb}.ipynb').read_text(encoding='utf-8'))['cells'] if c['cell_type'] == 'code']
    shown = [c for c in cells if c.get('outputs') and not re.search(r'^#\|\s*(hide|include:\s*false|output:\s*false)',
                                                                     ''.join(c['source']), re.M)]
    return len(shown), sum(any('image/png' in o.get('data', {}) for o in c['outputs']) for c in shown)

def test_outputs_and_images_render(pages):
    "Each notebook's committed outputs and figures are on its page, nothing is executed; every image on every page loads."
    for nb in (n for n in CHAPTERS if not n.endswith('.md')):
        p, (outputs, figures) = pages[build_site.page_name(nb) + '.html'], committed_outputs(nb)
        assert p['outputs'] >= outputs, f'{nb}: {outputs} cells with outputs, {p["outputs"]} shown'
        shown = [i for i in p['images'] if i['output']]
        assert len(shown) >= figures and all(i['width'] > 100 for i in shown), f'{nb}: {figures} figures, shown {shown}'
    assert any(i['src'].endswith('demo_loss.png') and i['ok'] for i in pages['index.html']['images'])
    for name, p in pages.items():
        bad = [i['src'] for i in p['images'] if not i['ok']]
        assert not bad, f'{name}: images that did not load: {bad}'

def test_api_docs_for_every_export(pages):
    "Each chapter shows nbdev's API entry (a heading and the signature) for every function and class it exports."
    for nb in (n for n in CHAPTERS if not n.endswith('.md')):
        src = json.loads((NBS/f'{nb}.ipynb').read_text(encoding='utf-8'))['cells']
        m = next((re.search(r'^#\|\s*default_exp\s+(\S+)', ''.join(c['source']), re.M) for c in src
                  if c['cell_type'] == 'code' and re.search(r'^#\|\s*default_exp', ''.join(c['source']), re.M)), None)
        if not m: continue
        mod = importlib.import_module(f'lm_basics.{m[1]}')
        names = [n for n in getattr(mod, '__all__', []) if (inspect.isfunction(o := getattr(mod, n)) or inspect.isclass(o))
                 and o.__module__ == mod.__name__]
        p = pages[build_site.page_name(nb) + '.html']
        missing = [n for n in names if n not in p['headings']]
        assert not missing, f'{nb}: no API entry for {missing}'
        unsigned = [n for n in names if not any(re.match(rf'(def|class) {n}\b', s) for s in p['signatures'])]
        assert not unsigned, f'{nb}: no signature for {unsigned}'
    assert 'TransformerLM' in pages['model.html']['headings'] and 'get_batch' in pages['data.html']['headings']

def test_internal_links_resolve(pages, server, site):
    "Every link within the site lands on a page or file that exists, at an anchor that exists; none points at the published site."
    checked, bad = 0, []
    for name, p in pages.items():
        for url in p['links']:
            u = urlsplit(url)
            if url.startswith(build_site.SITE_URL): bad.append(f'{name}: {url} (the published site, not this one)')
            if f'{u.scheme}://{u.netloc}' != server: continue
            path = unquote(u.path).lstrip('/') or 'index.html'
            checked += 1
            if not (site/path).is_file(): bad.append(f'{name}: {url} (no such file)')
            elif u.fragment and path.endswith('.html') and path in pages and unquote(u.fragment) not in pages[path]['ids']:
                bad.append(f'{name}: {url} (no #{u.fragment} there)')
    assert not bad, '\n'.join(bad)
    assert checked > 20 * len(pages)

def test_nothing_comes_from_the_network(pages, server):
    "Every page, MathJax and search included, loads only from the site itself."
    for name, p in pages.items():
        away = [u for u in p['requests'] if not u.startswith((server, 'data:', 'about:', 'blob:'))]
        assert not away, f'{name} requested {away}'
