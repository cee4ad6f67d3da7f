#!/usr/bin/env bash
# usage: check_unchanged.sh DIR "MESSAGE" -- COMMAND...
# Runs COMMAND and fails with MESSAGE if it changed anything under DIR. The check never loses work:
# DIR is restored to exactly what it was before, so a hand edit stays for you to move into a notebook.
set -euo pipefail
dir=$1; msg=$2; shift 2; [ "$1" = "--" ] && shift
snap=$(mktemp -d)
trap 'rm -rf "$snap"' EXIT
cp -a "$dir" "$snap/before"
"$@" >"$snap/log" 2>&1 || { cat "$snap/log"; echo "FAILED: $* (exit $?)"; exit 1; }
if ! diff -r -q -x __pycache__ -x '.ipynb_checkpoints' "$snap/before" "$dir" >"$snap/diff"; then
  sed "s#$snap/before#$dir(before)#g" "$snap/diff"
  diff -r -u -x __pycache__ -x '.ipynb_checkpoints' "$snap/before" "$dir" | head -60 || true
  rm -rf "$dir"; cp -a "$snap/before" "$dir"
  echo "FAILED: $msg"
  echo "($dir/ was restored to its state before the check.)"
  exit 1
fi
echo "ok: '$*' leaves $dir/ unchanged"
