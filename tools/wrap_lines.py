"""Wrap the code cells of notebooks so that no line is longer than 120 characters, keeping fastai's compact style.

A formatter (black, ruff format) would undo that style (one-line `if x: y`, aligned comments, docments), so this tool
only splits what is too long, one line at a time, and leaves everything else as it is. For a line too long, best first:

- a trailing `# comment` moves to its own line just above its code, at the same indentation; a comment line is
  wrapped at spaces (the rest joining the next line of the same comment);
- a one-line docstring becomes a triple-quoted one wrapped at spaces (a long line of a docstring is wrapped too);
  the lines of any other multi-line string are never touched;
- a one-line `if x: y` (`for`, `with`, `def`, ...) gets its body on the next line, and `a; b` becomes two lines;
- code is split between tokens inside brackets: after a comma, else before an operator, outermost first, the
  continuation aligned just after the opening bracket (4 deeper than the bracket's line when that is too far right),
  rows below that were aligned with what moved moving with it; an expression with operators outside brackets, or
  the names of a `from x import a, b`, are put in parentheses first;
- a string too long is split at a space into adjacent literals with the same prefix (never inside an f-string's
  `{...}`), the rest on a continuation line or joining the literal that already continues it; a string outside
  brackets is put in parentheses first.

What has no such place (a plain `import a, b`, an f-string that is one long `{...}`) stays long and is reported.
Every change is checked before it is kept: the cell's AST (whitespace in docstrings aside) and its docments (the
comment beside, or the comment lines right above, each argument and dataclass field, read as fastcore reads them;
whitespace aside) must not change. Directive lines (`#| export`) are never touched; cells that are not Python
(magics) are left alone. Notebooks are written as nbdev writes them; one whose outputs were fresh
(`metadata.lm_basics.code_sha256`, see run_notebooks.py) is re-stamped, as only the layout of its code changed.

Usage: python tools/wrap_lines.py [--check] [--width 120] NB.ipynb ...
       (--check writes nothing and lists the lines still too long; exit status 1 if there are any)
"""
from __future__ import annotations
import argparse, ast, io, json, re, sys, token, tokenize
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_notebooks import code_sha256, stamp_of   # the freshness stamp of a notebook's outputs

WIDTH = 120
DEEP = 40            # an alignment column leaving fewer than this many characters is too deep: indent 4 instead
LONG = 40            # a string at least this long is split before anything but a comma is broken
OPEN, CLOSE = '([{', ')]}'
BINARY = {'+', '-', '*', '/', '//', '%', '@', '|', '&', '^', '<<', '>>', '==', '!=', '<', '>', '<=', '>=',
          'if', 'else', 'for', 'and', 'or'}
BLANK = {token.NL, token.NEWLINE, token.INDENT, token.DEDENT, token.ENDMARKER}
STR_RE = re.compile(r'([a-zA-Z]*)(\'\'\'|"""|\'|")')

def _tokens(src:str) -> list:
    "The tokens of `src`, an f-string always one STRING token (Python 3.12 splits it into FSTRING_* tokens)."
    out, lines, start, depth = [], src.split('\n'), None, 0
    for t in tokenize.generate_tokens(io.StringIO(src).readline):
        name = token.tok_name[t.type]
        if name == 'FSTRING_START': start, depth = start or t.start, depth + 1
        if start is None: out.append(t); continue
        if name == 'FSTRING_END' and (depth := depth - 1) == 0:
            text = '\n'.join(lines[start[0]-1:t.end[0]])[start[1]:]
            text = text[:len(text) - len(lines[t.end[0]-1]) + t.end[1]]
            out.append(tokenize.TokenInfo(token.STRING, text, start, t.end, t.line)); start = None
    return out

def _blocks(node):
    "`node` and every statement in it, nested ones too (a walk that skips expressions)."
    yield node
    for field in ('body', 'orelse', 'finalbody', 'handlers', 'cases'):
        for s in getattr(node, field, None) or []:
            if isinstance(s, ast.AST): yield from _blocks(s)

def _docstring_nodes(tree) -> list:
    "The docstrings' `Constant` nodes of the module, classes and functions in `tree`."
    return [n.body[0].value for n in _blocks(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
            and isinstance(n.body[0].value.value, str)]

def _docments(src:str, tree) -> list:
    "The docments of every function and class in `src` as fastcore reads them (whitespace normalised), in AST order."
    coms = {t.start[0]: t.string[1:] for t in _tokens(src) if t.type == token.COMMENT}
    out = []
    for n in _blocks(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = n.args
            parms = {p.lineno: p.arg for p in a.args + ([a.vararg] if a.vararg else []) + a.kwonlyargs}
            if n.returns: parms[n.returns.lineno] = 'return'
        elif isinstance(n, ast.ClassDef):
            parms = {f.lineno: f.target.id
                     for f in n.body if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name)}
        else: continue
        first = min([n.lineno] + [d.lineno for d in n.decorator_list])   # docments sees the object's own source only
        for row, name in parms.items():
            if row in coms: doc = coms[row]
            else:   # the comment lines right above the argument, up to the previous argument's line
                above, r = [], row - 1
                while r >= first and r in coms and r not in parms: above.insert(0, coms[r]); r -= 1
                doc = ' '.join(above) if above else None
            if doc is not None: out.append((n.name, name, ' '.join(doc.split())))
    return out

def meaning(src:str):
    "What a rewrite must keep: the AST with docstrings' whitespace normalised, and the docments."
    tree = ast.parse(src)
    docs = _docments(src, tree)
    for c in _docstring_nodes(tree): c.value = ' '.join(c.value.split())
    return ast.dump(tree), docs

class _Code:
    "A cell's source with what the rewrites need: lines, tokens, bracket depth after each token, docstring tokens."
    def __init__(self, src:str):
        self.src, self.lines, self.toks, self.tree = src, src.split('\n'), _tokens(src), ast.parse(src)
        self.depth, self.inner, stack = [], [], []
        for i, t in enumerate(self.toks):
            if t.type == token.OP and t.string in OPEN: stack.append(i)
            elif t.type == token.OP and t.string in CLOSE and stack: stack.pop()
            self.depth.append(len(stack)); self.inner.append(stack[-1] if stack else None)
        starts = {(n.lineno, len(self.lines[n.lineno-1].encode()[:n.col_offset].decode()), n.end_lineno)
                  for n in _docstring_nodes(self.tree)}
        self.docs = {i for i, t in enumerate(self.toks) if t.type == token.STRING and (*t.start, t.end[0]) in starts}

    def indent(self, row:int) -> int: return len(self.lines[row-1]) - len(self.lines[row-1].lstrip())

    def replace(self, row:int, *new:str) -> str: return '\n'.join(self.lines[:row-1] + list(new) + self.lines[row:])

    def in_string(self, row:int) -> int|None:
        "The string token that row `row` starts inside of (a multi-line string begun on an earlier row), if any."
        return next((i for i, t in enumerate(self.toks) if t.type == token.STRING and t.start[0] < row <= t.end[0]),
                    None)

def _literal(text:str):
    "`(prefix, quote, body)` of a string literal's text."
    prefix, q = STR_RE.match(text).groups()
    return prefix, q, text[len(prefix) + len(q):len(text) - len(q)]

def _split_points(text:str) -> list[int]:
    """Where a one-line literal's body may be split: right after a space, never inside `{...}` of an f-string or
    `\\N{...}`."""
    prefix, q, body = _literal(text)
    f, raw, depth, i, out = 'f' in prefix.lower(), 'r' in prefix.lower(), 0, 0, []
    while i < len(body):
        c = body[i]
        if c == '\\' and not raw: i = body.find('}', i) + 1 if body.startswith('N{', i + 1) else i + 2; continue
        if f and depth == 0 and body.startswith(('{{', '}}'), i): i += 2; continue
        if f and c in '{}': depth += 1 if c == '{' else -1
        elif f and depth and c in '\'"': i = body.find(c, i + 1) + 1 or len(body); continue   # a string in a field
        elif c == ' ' and depth == 0 and body[i+1:i+2] not in ('', ' '): out.append(i + 1)
        i += 1
    return out

def _space_break(code:_Code, row:int, lo:int, hi:int, cont:str, width:int, ok=lambda p: True) -> str|None:
    "Break row `row` at a space between columns `lo` and `hi`, the rest on a new line starting with `cont`."
    line = code.lines[row-1]
    ps = [p for p in range(max(lo, code.indent(row) + 1), min(hi, len(line)))
          if line[p] == ' ' and line[p-1] not in ' \\'
          and len(cont) + len(line) - p - 1 < len(line) and ok(p)]
    p = max([p for p in ps if p <= width], default=None) or min(ps, default=None)   # a word longer than the line: alone
    return None if p is None else code.replace(row, line[:p], cont + line[p+1:])

def _docstring_fixes(code:_Code, row:int, width:int):
    "Wrap a docstring on `row`: a one-line one becomes triple-quoted, then its text is broken at spaces."
    i = next((i for i in code.docs if code.toks[i].start[0] <= row <= code.toks[i].end[0]), None)
    if i is None: return
    t, line = code.toks[i], code.lines[row-1]
    prefix, q, body = _literal(t.string)
    lo = t.start[1] + len(prefix) + len(q) if row == t.start[0] else 0
    hi = t.end[1] - len(q) if row == t.end[0] else len(line)
    if lo > width or (row == t.end[0] and t.end[1] <= width): return   # what is too long is not the docstring
    first = line[:t.start[1]].strip() == ''
    cont = ' ' * (t.start[1] if first else code.indent(t.start[0]) + 4)
    nq = [m.span() for m in re.finditer(r'\\N\{[^}]*\}', line)] if 'r' not in prefix.lower() else []
    ok = lambda p: not any(a <= p < b for a, b in nq)
    if len(q) == 1:
        if not any(line[p] == ' ' and ok(p) for p in range(lo, hi)) or q * 3 in body: return
        yield 'docstring quotes', code.replace(row, line[:t.start[1]] + prefix + q * 3 + body + q * 3 + line[t.end[1]:])
    elif (new := _space_break(code, row, lo, hi, cont, width, ok)): yield 'docstring', new

def _comment_reflow(code:_Code, row:int, cont:str, width:int) -> str|None:
    """Wrap comment line `row` at a space, the rest to the front of the next line when that continues the same comment
    (a comment line at the same column, with the same `#` marker, not a list item)."""
    new = _space_break(code, row, len(cont), len(code.lines[row-1]), cont, width)
    nxt = code.lines[row] if row < len(code.lines) else ''
    if new is None or not nxt.startswith(cont) or re.match(r'\s*([-*•]|\d+[.)])?\s*$|[-*•]\s|\d+[.)]\s|\s|\|',
                                                         nxt[len(cont):]):
        return None
    lines = new.split('\n')
    return '\n'.join(lines[:row] + [lines[row] + ' ' + nxt[len(cont):]] + lines[row+2:])

def _move_comment(code:_Code, row:int, c:int, blank:bool=False) -> str|None:
    """Move the trailing comment `c` of row `row` to its own line above the code (above the statement if it must);
    with `blank`, after an empty line, so that it does not join a comment line above it (as docments would read it)."""
    target = row
    if code.in_string(row) is not None or row > 1 and code.lines[row-2].rstrip().endswith('\\'):
        i = c
        while i > 0 and code.toks[i-1].type != token.NEWLINE: i -= 1
        while code.toks[i].type in BLANK | {token.COMMENT}: i += 1
        target = code.toks[i].start[0]
    line, lines = code.lines[row-1], list(code.lines)
    lines[row-1] = line[:code.toks[c].start[1]].rstrip()
    if blank and not (target > 1 and code.lines[target-2].lstrip().startswith('#')): return None
    lines[target-1:target-1] = [''] * blank + [' ' * code.indent(target) + code.toks[c].string]
    return '\n'.join(lines)

def _param_break(code:_Code, row:int) -> str|None:
    "Break a `def` row before its last argument, so that the argument's comment can then move above it (docments)."
    args = [a for n in _blocks(code.tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            for a in n.args.args + n.args.kwonlyargs if a.lineno == row]
    if not args: return None
    col = len(code.lines[row-1].encode()[:args[-1].col_offset].decode())
    b = next((i for i, t in enumerate(code.toks) if t.start == (row, col)), None)
    return None if b is None else _token_break(code, row, b - 1, b, hang=False)

def _token_break(code:_Code, row:int, a:int, b:int, width:int=WIDTH, hang:bool=True, join:bool=False) -> str|None:
    """Split row `row` between tokens `a` and `b`, the continuation aligned after the innermost open bracket (4 deeper
    than the bracket's line when `b` opens the bracket's contents and `hang`, or when that is too far right). With
    `join`, the continuation goes to the front of the next row instead, if that row continues the same brackets at the
    same column and still fits."""
    ob, line = code.inner[a], code.lines[row-1]
    first = next(i for i in range(ob + 1, len(code.toks)) if code.toks[i].type not in BLANK | {token.COMMENT})
    four = code.indent(code.toks[ob].start[0]) + 4
    col = four if first == b and hang else code.toks[ob].end[1] if first == b else code.toks[first].start[1]
    rest = line[code.toks[b].start[1]:]
    if col > width - DEEP and col + len(rest) > width: col = min(col, four)
    if col + len(rest) >= len(line) or not line[:code.toks[a].end[1]].strip(): return None
    if not join: return _shift_rows(code, row, a, code.toks[b].start[1], col,
                                    code.replace(row, line[:code.toks[a].end[1]].rstrip(), ' ' * col + rest))
    n = next((i for i in range(b, len(code.toks)) if code.toks[i].type == token.NL), len(code.toks) - 1) + 1
    nxt = code.lines[row] if row < len(code.lines) else ''
    if (n >= len(code.toks) or code.toks[n].start != (row + 1, col) or code.toks[n-1].start[0] != row
        or code.inner[n-1] != ob or not rest.rstrip().endswith(',') or len(rest.rstrip()) + 1 + len(nxt) > width):
        return None
    return '\n'.join(code.lines[:row-1] + [line[:code.toks[a].end[1]].rstrip(), ' ' * col + rest.rstrip() + ' '
                                           + nxt.lstrip()] + code.lines[row+1:])

def _shift_rows(code:_Code, row:int, a:int, old:int, col:int, new:str) -> str:
    """`new` (row `row` split after token `a`, what was at column `old` now at `col`) with the rows below that continue
    the same brackets at column `old` or further right moved by as much, so that they stay aligned."""
    close = next((j for j in range(a, len(code.toks)) if code.depth[j] < code.depth[a]), len(code.toks) - 1)
    lines = new.split('\n')
    for k in range(row + 1, code.toks[close].start[0] + 1):
        if code.in_string(k) is not None: break
        if code.lines[k-1].strip() and code.indent(k) >= old:
            lines[k] = ' ' * (code.indent(k) + col - old) + code.lines[k-1].lstrip()
    return '\n'.join(lines)

def _string_split(code:_Code, row:int, s:int, width:int) -> str|None:
    """Split the one-line string token `s` at a space: as much as fits stays on this row; the rest goes below it,
    aligned, or to the front of the next literal when the string already continues on the next row."""
    t, line, toks = code.toks[s], code.lines[row-1], code.toks
    prefix, q, body = _literal(t.string)
    room = width - t.start[1] - len(prefix) - 2 * len(q)
    fits = [p for p in _split_points(t.string) if p <= room]
    if not fits: return None
    p = max([p for p in fits if len(body) - p >= 12] or fits)   # rather not leave a word or two alone
    n = s + 2   # after the NL: the next literal of an implicit concatenation, first on its row?
    if (s + 1 < len(toks) and toks[s+1].type == token.NL and n < len(toks) and toks[n].type == token.STRING
        and toks[n].start == (row + 1, code.indent(row + 1)) and toks[n].end[0] == row + 1 and n not in code.docs
        and _literal(toks[n].string)[:2] == (prefix, q)):
        nxt, rest = code.lines[row], _literal(toks[n].string)[2]
        return '\n'.join(code.lines[:row-1] + [line[:t.start[1]] + prefix + q + body[:p] + q,
                          nxt[:toks[n].start[1]] + prefix + q + body[p:] + rest + q + nxt[toks[n].end[1]:]]
                         + code.lines[row+1:])
    return code.replace(row, line[:t.start[1]] + prefix + q + body[:p] + q,
                        ' ' * t.start[1] + prefix + q + body[p:] + q + line[t.end[1]:])

def _stmt_starts(tree) -> dict:
    "`{(row, byte col): statement}` of every statement, and for each its previous sibling on the same row (or None)."
    out = {}
    for n in _blocks(tree):
        for field in ('body', 'orelse', 'finalbody'):
            body = getattr(n, field, None)
            if not isinstance(body, list): continue
            for prev, s in zip([None] + body, body):
                if isinstance(s, ast.stmt):
                    out[s.lineno, s.col_offset] = prev if prev and prev.end_lineno == s.lineno else None
    return out

def _body_and_statement_fixes(code:_Code, row:int, seq:list, width:int):
    """Split a one-line `if x: y` after its colon (the body 4 deeper, its continuation rows moved with it), or a row
    of statements `a; b` at a semicolon."""
    toks, line, ind = code.toks, code.lines[row-1], code.indent(row)
    before = [t for t in toks[:seq[0]] if t.type not in (token.NL, token.COMMENT, token.INDENT, token.DEDENT)]
    if toks[seq[0]].start != (row, ind) or before and before[-1].type != token.NEWLINE: return
    end = next(t for t in toks[seq[-1]:] if t.type == token.NEWLINE).start[0]   # the last row of the logical line
    starts, byte = _stmt_starts(code.tree), lambda col: len(line[:col].encode())
    def chain_start(s):   # the first of the statements `a; b; c` that `s` is one of
        while (prev := starts.get((row, s.col_offset))) is not None: s = prev
        return s
    semi = None
    for a, b in zip(seq, seq[1:]):
        key = (row, byte(toks[b].start[1]))
        if key not in starts or code.depth[a] or toks[a].end[1] > width: continue
        if toks[a].string == ':' and starts[key] is None:
            shift = ind + 4 - toks[b].start[1]
            if any(code.in_string(k) is not None or code.indent(k) + shift < ind + 4 for k in range(row + 1, end + 1)
                   if code.lines[k-1].strip()): continue
            lines = [line[:toks[a].end[1]].rstrip(), ' ' * (ind + 4) + line[toks[b].start[1]:]]
            lines += [' ' * (code.indent(k) + shift) + code.lines[k-1].lstrip() if code.lines[k-1].strip() else ''
                      for k in range(row + 1, end + 1)]
            yield 'body', '\n'.join(code.lines[:row-1] + lines + code.lines[end:])
        if (toks[a].string == ';' and end == row and starts[key] is not None
            and chain_start(starts[key]).col_offset == byte(ind)):
            semi = a, b
    if semi:
        a, b = semi
        yield 'statements', code.replace(row, line[:toks[a].start[1]].rstrip(), ' ' * ind + line[toks[b].start[1]:])

PRECEDENCE = [{'for'}, {'if', 'else'}, {'or'}, {'and'}, {'==', '!=', '<', '>', '<=', '>='}, {'|'}, {'^'}, {'&'},
              {'<<', '>>'}, {'+', '-'}, {'*', '/', '//', '%', '@'}]

def _code_fixes(code:_Code, row:int, width:int):
    """Splits of code row `row`, best first: a one-line body or statements onto their own lines; then, outermost
    first, after a comma, before an operator (after parenthesising an expression with operators outside brackets), in
    a long string; then whatever else still shortens the row."""
    toks, line = code.toks, code.lines[row-1]
    seq = [i for i, t in enumerate(toks) if t.type not in BLANK | {token.COMMENT} and t.end[0] == row
           and (t.start[0] == row or t.type == token.STRING)]
    if not seq: return
    yield from _body_and_statement_fixes(code, row, seq, width)
    pairs = [(a, b) for a, b in zip(seq, seq[1:]) if code.depth[a] and toks[a].end[1] <= width
             and toks[b].start[0] == row
             and not (toks[b].type == token.OP and toks[b].string in (*CLOSE, '.', '=', ':'))
             and not (toks[a].type == token.OP and toks[a].string in ('.', '=', ':', '*', '**', '~'))]
    cands = []   # (sort key, kind, function making the new source)
    brk = lambda a, b: lambda: _token_break(code, row, a, b, width)
    closes = {}   # an open bracket's index -> (row, column) where it closes
    for j, t in enumerate(toks):
        if t.type == token.OP and t.string in CLOSE and j and code.inner[j-1] is not None:
            closes[code.inner[j-1]] = t.start
    for a, b in pairs:
        d, pos, ta, tb = code.depth[a], -toks[a].end[1], toks[a], toks[b]
        if closes.get(code.inner[a], (row + 1, 0)) <= (row, width): d += 50   # a group closed before the overflow
        if ta.string == ',' and not _in_target(code, a):
            cands.append(((d, 0, 0, pos), 'comma into the next row',
                          lambda a=a, b=b: _token_break(code, row, a, b, width, join=True)))
            cands.append(((d, 0, 0, pos), 'comma', brk(a, b)))
        elif tb.string in BINARY:   # the lowest precedence first, unless it leaves a mere word before it
            level = next(i for i, ops in enumerate(PRECEDENCE) if tb.string in ops)
            level += 100 * (ta.end[1] - toks[code.inner[a]].end[1] < 12)
            cands.append(((d, 1, level, pos), 'operator', brk(a, b)))
        elif ta.string in OPEN: cands.append(((99, 2, 0, pos), 'bracket', brk(a, b)))
    for s in seq:   # split a one-line string: a long one crossing the limit as a comma would be; any other later
        t = toks[s]
        if t.type != token.STRING or s in code.docs or t.start[0] != t.end[0] or t.start[1] > width - 20: continue
        if t.end[1] > width and len(t.string) >= LONG: key = (code.depth[s], 2, 0, 0)
        else: key = (99, 0 if t.end[1] > width else 1, 0, -t.start[1])
        if not code.depth[s]: kind, make = 'string parentheses', lambda s=s: _parenthesise_string(code, row, s, width)
        elif t.start[1] > width - DEEP and code.inner[s] == s - 1:   # too far right: first on a row of its own
            kind, make = 'string line', lambda s=s: _token_break(code, row, s - 1, s, width)
        else: kind, make = 'string', lambda s=s: _string_split(code, row, s, width)
        cands.append(((99, 5, 0, 0) if kind == 'string parentheses' else key, kind, make))
    cands.append(((0.5, 0, 0, 0), 'parentheses', lambda: _parenthesise(code, row, width, OPERATORS)))
    cands.append(((0.5, 0, 0, 0), 'import parentheses', lambda: _import_parentheses(code, row)))
    cands.append(((99, 4, 0, 0), 'dedent', lambda: _dedent(code, row, seq)))
    for key, kind, make in sorted(cands, key=lambda c: c[0]): yield kind, make()

def _dedent(code:_Code, row:int, seq:list) -> str|None:
    "Indent a continuation row 4 deeper than the line of its bracket, when it was aligned further right."
    i = seq[0]
    if code.toks[i].start[0] != row or i == 0 or not code.depth[i-1]: return None
    col = code.indent(code.toks[code.inner[i-1]].start[0]) + 4
    line = code.lines[row-1]
    return code.replace(row, ' ' * col + line.lstrip()) if col < code.indent(row) else None

def _in_target(code:_Code, c:int) -> bool:
    "Whether comma `c` separates the targets of a `for` (in a comprehension) or the parameters of a `lambda`."
    for i in range(c - 1, -1, -1):
        t = code.toks[i]
        if code.depth[i] < code.depth[c] or t.string in ('in', ':') and code.depth[i] == code.depth[c]: return False
        if t.string in ('for', 'lambda') and code.depth[i] == code.depth[c]: return True
    return False

OPERATORS = (ast.BoolOp, ast.BinOp, ast.Compare, ast.IfExp, ast.Tuple)   # what breaks well once in parentheses

def _wrap_node(code:_Code, row:int, n) -> str:
    "Row `row` with parentheses around the one-row AST node `n`."
    line = code.lines[row-1]
    a, b = (len(line.encode()[:o].decode()) for o in (n.col_offset, n.end_col_offset))
    return code.replace(row, line[:a] + '(' + line[a:b] + ')' + line[b:])

def _outside_brackets(code:_Code, row:int, n) -> bool:
    """Whether the AST node `n` on `row` starts a token outside any bracket (not in an f-string) and is not bracketed
    whole."""
    line = code.lines[row-1]
    start, end = [(row, len(line.encode()[:o].decode())) for o in (n.col_offset, n.end_col_offset)]
    i = next((i for i, t in enumerate(code.toks) if t.start == start), None)
    if i is None or i and code.depth[i-1]: return False
    if code.toks[i].string not in OPEN: return True
    j = next(j for j in range(i, len(code.toks)) if code.depth[j] == code.depth[i] - 1)   # the matching closing bracket
    return code.toks[j].end != end

def _parenthesise(code:_Code, row:int, width:int, types=OPERATORS) -> str|None:
    "Put parentheses around the outermost expression with operators that is too long, outside brackets."
    cut = len(code.lines[row-1][:width].encode())
    outer = [n for n in ast.walk(code.tree) if isinstance(n, types) and getattr(n, 'lineno', 0) == n.end_lineno == row
             and n.col_offset < cut < n.end_col_offset and _outside_brackets(code, row, n)]
    return _wrap_node(code, row, min(outer, key=lambda n: (n.col_offset, -n.end_col_offset))) if outer else None

def _parenthesise_string(code:_Code, row:int, s:int, width:int) -> str|None:
    "Put parentheses around a long string outside brackets (with its implicitly concatenated neighbours), to split it."
    t, line = code.toks[s], code.lines[row-1]
    if not [p for p in _split_points(t.string) if t.start[1] + p < width]: return None
    a, b = len(line[:t.start[1]].encode()), len(line[:t.end[1]].encode())
    nodes = [n for n in ast.walk(code.tree) if isinstance(n, (ast.Constant, ast.JoinedStr))
             and getattr(n, 'lineno', 0) == n.end_lineno == row and n.col_offset <= a and n.end_col_offset >= b]
    return _wrap_node(code, row, min(nodes, key=lambda n: (n.col_offset, -n.end_col_offset))) if nodes else None

def _import_parentheses(code:_Code, row:int) -> str|None:
    "Put parentheses around the names of a one-row `from x import a, b`."
    line = code.lines[row-1]
    imp = next((n for n in _blocks(code.tree) if isinstance(n, ast.ImportFrom) and n.lineno == n.end_lineno == row),
               None)
    if imp is None or '(' in line or ' import ' not in line: return None
    at = line.index(' import ') + len(' import ')
    return code.replace(row, line[:at] + '(' + line[at:].rstrip() + ')')

def _fixes(code:_Code, row:int, width:int):
    "Candidate rewrites of the long row `row`, best first, as `(kind, new source)`."
    yield from _docstring_fixes(code, row, width)
    line, inside = code.lines[row-1], code.in_string(row)
    if inside is not None and (code.toks[inside].end[0] > row or code.toks[inside].end[1] > width): return
    on_row = [i for i, t in enumerate(code.toks) if t.start[0] == row and t.type not in BLANK]
    c = next((i for i in on_row if code.toks[i].type == token.COMMENT), None)
    if c is not None and on_row[0] == c and inside is None:   # a comment line
        t = code.toks[c]
        if t.string.startswith('#|'): return   # a notebook directive
        cont = ' ' * t.start[1] + re.match(r'#+ ?', t.string).group()
        yield 'comment into the next line', _comment_reflow(code, row, cont, width)
        yield 'comment', _space_break(code, row, len(cont), len(line), cont, width)
        return
    if c is not None:
        yield 'move comment', _move_comment(code, row, c)
        yield 'move comment after a blank line', _move_comment(code, row, c, blank=True)
        yield 'argument', _param_break(code, row)
    yield from _code_fixes(code, row, width)

def wrap_source(src:str, width:int=WIDTH) -> tuple[str, str|None]:
    "`src` with its lines wrapped to `width` where it can be, and why it was left alone (None if it was not)."
    if all(len(l) <= width for l in src.split('\n')): return src, None
    try: base = meaning(src)
    except SyntaxError: return src, 'not Python (a magic?)'
    cur, stuck, seen = src, set(), {src}
    for _ in range(10_000):
        new, code = None, _Code(cur)
        for row, line in enumerate(code.lines, 1):
            if len(line) <= width: continue
            for kind, cand in _fixes(code, row, width):
                if cand is None or cand in seen or (line, kind) in stuck: continue
                try: same = meaning(cand) == base
                except SyntaxError: same = False
                if same: new = cand; break
                stuck.add((line, kind))
            if new: break
        if new is None: break
        cur = new; seen.add(new)
    if meaning(cur) != base: return src, 'the rewrite changed its meaning'   # never: every step was checked
    return cur, None

def _long(src:str, width:int) -> list[tuple[int, str]]:
    return [(i, l) for i, l in enumerate(src.split('\n'), 1) if len(l) > width]

def wrap_notebook(path:Path, width:int=WIDTH, write:bool=True) -> tuple[int, list[str]]:
    "Wrap the code cells of the notebook at `path`: the number of long lines before, and one line per line left long."
    text = path.read_text(encoding='utf-8')
    nb = json.loads(text)
    cells = nb.get('cells') if isinstance(nb, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) and 'cell_type' in c for c in cells):
        raise ValueError('it is not a notebook (no list of cells)')
    fresh, before, left = stamp_of(nb) == code_sha256(nb), 0, []
    for n, cell in enumerate(nb['cells']):
        if cell['cell_type'] != 'code': continue
        src = ''.join(cell['source'])
        before += len(_long(src, width))
        new, why = wrap_source(src, width) if write else (src, None)
        for i, l in _long(new, width):
            note = f" ({why or 'no safe place to split it'})" if write else ''
            left.append(f"{path}: cell {n} (id {cell.get('id')}) line {i}, {len(l)} chars{note}: {l.strip()[:60]}")
        if new != src: cell['source'] = re.findall(r'.*\n|.+$', new)   # lines, as nbdev stores them
    if fresh: nb['metadata']['lm_basics']['code_sha256'] = code_sha256(nb)
    out = json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + '\n'   # as nbdev (execnb's write_nb) writes it
    if write and out != text: path.write_text(out, encoding='utf-8')
    return before, left

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('notebooks', nargs='+', type=Path, help='the notebooks to wrap')
    p.add_argument('--check', action='store_true',
                   help='write nothing; list the lines longer than --width (exit 1 if any)')
    p.add_argument('--width', type=int, default=WIDTH, help=f'the longest line allowed (default: {WIDTH})')
    a = p.parse_args(argv)
    total = 0
    for path in a.notebooks:
        try: before, left = wrap_notebook(path, a.width, write=not a.check)
        except (OSError, ValueError) as e:
            print(f"wrap_lines: cannot read notebook {path}: {e}", file=sys.stderr); return 2
        for l in left: print(l)
        if not a.check: print(f"{path}: {before} lines longer than {a.width} -> {len(left)}")
        total += len(left)
    return 1 if a.check and total else 0

if __name__ == '__main__': sys.exit(main())
