#!/usr/bin/env bash
# The README's test command: set up, build, install, then run the whole test suite against the installed
# package. GPU tests run on a Hopper GPU and are skipped (with the reason) elsewhere.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/tools/setup_env.sh"
# Run from outside the checkout so that `import flashmla_ops` finds the installed package (with its compiled
# extension and flashmla_ops.meta), not the source folder.
cd "${TMPDIR:-/tmp}"
exec "${PYTHON:-python3}" -m pytest --rootdir="$repo" "$repo/tests" -q -p no:cacheprovider -rs "$@"
