#!/usr/bin/env bash
# Creates (or reuses) the virtual environment that holds the project's dependencies, then links it to ./.venv.
#
# The venv lives in a cache folder keyed on the dependency list and the Python version, so a second checkout (or
# the next CI run) with the same pyproject dependencies reuses it instead of reinstalling ~5.5 GB of torch. A
# venv counts only when its install finished (the `.complete` marker is written last); a half-built one is
# thrown away and rebuilt. The project itself is not installed into the venv: everything runs from the
# checkout (manage.py, `python -m pytest` with pythonpath=".").
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

requirements=$("$PYTHON" - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [requirement for group in project["optional-dependencies"].values() for requirement in group]
print("\n".join(project["dependencies"] + extras))
PY
)
key=$( { "$PYTHON" -c 'import sys; print(sys.version)'; echo "$requirements"; } | sha256sum | cut -c1-16)
# As root, the embedded PostgreSQL runs its binaries (inside the venv) as an unprivileged user, which cannot
# traverse /root: so root keeps the cache under /var/cache.
if [ "$(id -u)" = 0 ]; then default_cache=/var/cache/shop_search; else default_cache=${XDG_CACHE_HOME:-$HOME/.cache}/shop_search; fi
cache=${SHOP_SEARCH_CACHE:-$default_cache}
venv="$cache/venv-$key"
mkdir -p "$cache"

exec 9>"$venv.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
    echo ">> creating the virtual environment in $venv (a cold torch install takes a few minutes)"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    echo "$requirements" > "$venv/requirements.txt"
    # pip's find-links/extra-index setup on these machines warns once per package about missing local index folders.
    "$venv/bin/python" -m pip install --quiet --progress-bar off -r "$venv/requirements.txt" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    [ "${PIPESTATUS[0]}" = 0 ]
    touch "$venv/.complete"
fi
flock -u 9
ln -sfn "$venv" .venv
# The C extension lives in the checkout (the venv is shared between checkouts): built here, in a second when it has
# changed. Without a compiler the project still runs (the coarse stage falls back to faiss), so a failure only warns.
"$venv/bin/python" scripts/build_native.py \
    || echo ">> WARNING: the C range scan was not built; large catalogs' coarse stage will use faiss (slower)"
echo ">> virtual environment ready: .venv -> $venv"
