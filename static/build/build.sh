#!/usr/bin/env bash
# Rebuilds static/vendor/ from the exact versions pinned in package.json and package-lock.json.
# Needs Node 20+ and the npm registry; the page itself never needs the network.
set -euo pipefail
cd "$(dirname "$0")"
vendor=../vendor
mkdir -p "$vendor"

npm ci --no-audit --no-fund

cp node_modules/htmx.org/dist/htmx.min.js "$vendor/htmx.min.js"
cp node_modules/htmx-ext-sse/dist/sse.js "$vendor/htmx-ext-sse.js"

npx --no-install esbuild codemirror-entry.js \
  --bundle --format=iife --global-name=CM --minify --target=es2020 \
  --legal-comments=eof --metafile=node_modules/.codemirror-meta.json \
  --outfile="$vendor/codemirror.js"

node licenses.mjs node_modules/.codemirror-meta.json "$vendor/LICENSES.md"
ls -l "$vendor"
