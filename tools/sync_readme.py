"""Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which is not available everywhere).

The README is the index notebook's markdown cells, joined by blank lines, with links and images to files beside the
notebook (`images/...`, relative to nbs/) pointed into nbs/, since the README lives at the root. `tests/test_readme.py`
checks the two agree.
Usage: python tools/sync_readme.py [--check]
"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def render(nb_path=ROOT/'nbs'/'index.ipynb') -> str:
    cells = json.loads(Path(nb_path).read_text(encoding='utf-8'))['cells']
    text = '\n\n'.join(''.join(c['source']).strip() for c in cells if c['cell_type'] == 'markdown') + '\n'
    return re.sub(r'\]\((images/[^)\s]+)\)', r'](nbs/\1)', text)

if __name__ == '__main__':
    text, readme = render(), ROOT/'README.md'
    if '--check' in sys.argv:
        ok = readme.exists() and readme.read_text(encoding='utf-8') == text
        print('README.md is in step with nbs/index.ipynb' if ok else 'README.md differs from nbs/index.ipynb: run python tools/sync_readme.py')
        sys.exit(0 if ok else 1)
    readme.write_text(text, encoding='utf-8'); print(f'wrote {readme}')
