#!/usr/bin/env bash
# Prints the path of a Python 3.12 interpreter: python3.12 on PATH, else one under pyenv.
# Exits 1 with a message naming what to install when none is found.
set -u
for cand in "${PYTHON312:-}" "$(command -v python3.12 2>/dev/null)"; do
  if [ -n "$cand" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    echo "$cand"; exit 0
  fi
done
pyenv_root="${PYENV_ROOT:-$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")}"
for cand in $(ls -d "$pyenv_root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r); do
  if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    echo "$cand"; exit 0
  fi
done
echo "error: Python 3.12 not found (looked for python3.12 on PATH, \$PYTHON312, and $pyenv_root/versions/3.12*)." >&2
echo "       Install it, e.g. 'pyenv install 3.12', or set PYTHON312=/path/to/python3.12." >&2
exit 1
