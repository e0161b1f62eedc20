#!/usr/bin/env bash
# Download, on a machine with network, the wheels that tools/gpu_check.sh installs on a GPU machine without one:
# lm_basics' own requirements (settings.ini: requirements, hf_requirements), pytest, and nbdev with its pins
# (dev_requirements), with everything they need, built for the GPU machine's Python. Never torch: the GPU machine's
# own PyTorch (built for its CUDA) is the one the check tests, so torch and its CUDA wheels are refused here.
#
#   tools/gpu_wheels.sh [--python-version 3.12] [--dest shared/wheels] [--skip NAME,NAME...]
#
# --python-version  the GPU machine's Python, MAJOR.MINOR (default: 3.12)
# --dest            where the wheels go (default: shared/wheels, where gpu_check.sh looks; it travels with the tree)
# --skip            top-level packages the GPU machine already has, left out to keep the folder small, e.g.
#                   --skip matplotlib,tokenizers,tqdm,transformers,safetensors,pytest,numpy
#                   (what they need is then not downloaded for them either; gpu_check.sh uses what is installed there)
set -euo pipefail
cd "$(dirname "$0")/.."

PYV=3.12 DEST=shared/wheels SKIP=
while [[ $# -gt 0 ]]; do
  case $1 in
    --python-version) PYV=$2; shift 2;;
    --dest) DEST=$2; shift 2;;
    --skip) SKIP=$2; shift 2;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0;;
    *) echo "error: unknown argument $1; see $0 --help" >&2; exit 2;;
  esac
done
[[ $PYV =~ ^3\.[0-9]+$ ]] || { echo "error: --python-version must be MAJOR.MINOR, e.g. 3.12, got $PYV" >&2; exit 2; }
PY=${PYTHON:-python3}

# The requirement lines of settings.ini (one source of truth), less torch and the --skip names.
mapfile -t REQS < <("$PY" - "$SKIP" <<'EOF'
import configparser, re, sys
c = configparser.ConfigParser(delimiters=['=']); c.read('settings.ini')
d = c['DEFAULT']
nbdev_pins = [r for r in d.get('dev_requirements', '').split() if re.match(r'(nbdev|fastcore|execnb|ghapi)\b', r)]
reqs = d.get('requirements', '').split() + d.get('hf_requirements', '').split() + ['pytest>=8'] + nbdev_pins
skip = {s.strip().lower() for s in sys.argv[1].split(',') if s.strip()} | {'torch'}
name = lambda r: re.match(r'[A-Za-z0-9_.\-]+', r)[0].lower()
seen = set()
for r in reqs:
    if name(r) not in skip and name(r) not in seen: seen.add(name(r)); print(r)
EOF
)
[[ ${#REQS[@]} -gt 0 ]] || { echo "error: nothing to download (settings.ini has no requirements, or --skip left none)" >&2; exit 2; }
echo "Downloading for CPython $PYV (manylinux x86-64) into $DEST: ${REQS[*]}"
mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download --disable-pip-version-check --only-binary=:all: --python-version "$PYV" --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${REQS[@]}"

# torch must come from the GPU machine, never from here (a CPU wheel, or one for another CUDA, would replace it)
bad=$(cd "$DEST" && ls | grep -Ei '^(torch|triton|nvidia_)[^/]*\.whl$' || true)
if [[ -n $bad ]]; then
  echo "error: these were pulled in as dependencies, and must not be carried to the GPU machine: $bad" >&2
  echo "       find the package that needs them (pip show), leave it out with --skip, and remove them from $DEST" >&2
  exit 1
fi
echo "$(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
