#!/bin/sh
# Install the agent CLIs that tests/test_real_clis.py drives, pinned, from npm into DIR
# (default .clis/, git-ignored). A no-op once that pair of versions is installed.
set -eu
DIR=${1:-.clis}
CLAUDE_CODE=2.1.332
CODEX=0.171.0
STAMP="$DIR/.stamp-$CLAUDE_CODE-$CODEX"
[ -f "$STAMP" ] && exit 0
command -v npm >/dev/null 2>&1 || { echo "install_clis: npm not found; the real-CLI tests will skip" >&2; exit 0; }
mkdir -p "$DIR"
npm install --prefix "$DIR" --no-audit --no-fund --loglevel=error \
    "@anthropic-ai/claude-code@$CLAUDE_CODE" "@openai/codex@$CODEX"
touch "$STAMP"
