#!/usr/bin/env bash
# Makes target/patched/<crate>-<version> for every patches/<crate>-<version>.diff: the crates.io
# source of that crate with the diff applied (why: README.md beside this script).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
meta=""
for diff in "$here"/patches/*.diff; do
  id="$(basename "$diff" .diff)"            # e.g. cubecl-wgpu-0.11.3
  name="${id%-*}"; version="${id##*-}"
  dest="$root/target/patched/$id"
  if [ -f "$dest/.tgate-patch" ] && cmp -s "$dest/.tgate-patch" "$diff"; then continue; fi
  # The root workspace depends on both crates (through burn's wgpu feature): cargo metadata
  # downloads them if needed and says where their sources are.
  [ -n "$meta" ] || meta="$(cd "$root" && cargo metadata --format-version 1 --locked)"
  manifest="$(printf '%s' "$meta" | python3 -c 'import json,sys; n,v=sys.argv[1:]; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]==n and p["version"]==v))' "$name" "$version")"
  rm -rf "$dest"
  mkdir -p "$(dirname "$dest")"
  cp -r "$(dirname "$manifest")" "$dest"
  chmod -R u+w "$dest"
  patch -s -p1 -d "$dest" < "$diff"
  cp "$diff" "$dest/.tgate-patch"
  echo "patched $name $version in $dest"
done
