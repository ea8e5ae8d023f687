#!/usr/bin/env bash
# Makes target/patched/cubecl-wgpu-0.11.3: the crates.io source of cubecl-wgpu with
# patches/cubecl-wgpu-0.11.3-no-subgroups.diff applied (see README.md beside this script).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dest="$root/target/patched/cubecl-wgpu-0.11.3"
diff="$here/patches/cubecl-wgpu-0.11.3-no-subgroups.diff"
stamp="$dest/.tgate-patch"
if [ -f "$stamp" ] && cmp -s "$stamp" "$diff"; then exit 0; fi
# The root workspace depends on cubecl-wgpu 0.11.3 (through burn's wgpu feature): cargo metadata
# downloads it if needed and says where its source is.
manifest="$(cd "$root" && cargo metadata --format-version 1 --locked \
  | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cubecl-wgpu" and p["version"]=="0.11.3"))')"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
cp -r "$(dirname "$manifest")" "$dest"
chmod -R u+w "$dest"
patch -s -p1 -d "$dest" < "$diff"
cp "$diff" "$stamp"
echo "patched cubecl-wgpu 0.11.3 in $dest"
