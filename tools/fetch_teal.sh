#!/usr/bin/env bash
# Puts TEAL's Triton sparse GEMV (FasterDecoding/TEAL, kernels/) in .teal/ (git-ignored) for
# `bench/dense_kernels.py --teal .teal`: a peer measured in the same run, never vendored into this repository.
# Usage: tools/fetch_teal.sh [TEAL_GIT_DIR_OR_URL]   (default: clone https://github.com/FasterDecoding/TEAL)
# The device call carries it: run(..., carry=[".teal"]).
set -euo pipefail
src=${1:-https://github.com/FasterDecoding/TEAL}
dest=$(git rev-parse --show-toplevel)/.teal
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
if [ -d "$src" ] && git --git-dir="$src" rev-parse HEAD >/dev/null 2>&1; then
  gitdir=$src                                       # a bare mirror / .git folder
else
  git clone -q --depth 1 "$src" "$tmp/teal"; gitdir=$tmp/teal/.git
fi
mkdir -p "$tmp/out/kernels"
for f in sparse_gemv.py compile_wrapper.py kernel_utils.py __init__.py; do
  git --git-dir="$gitdir" show "HEAD:kernels/$f" > "$tmp/out/kernels/$f"
done
git --git-dir="$gitdir" rev-parse HEAD > "$tmp/out/COMMIT"
rm -rf "$dest" && mv "$tmp/out" "$dest"
echo "TEAL $(cat "$dest/COMMIT") kernels in $dest"
