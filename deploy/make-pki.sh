#!/usr/bin/env bash
# Makes a bus's authority and the certificates of a three-junction bus and
# of one service, into the directory given (default ./pki). Run it once, on
# the operator's machine; copy each junction's key and certificate to its
# machine, and the authority's certificate (never its key) to every machine.
set -euo pipefail
JUNCTION=${JUNCTION:-junction}
out=${1:-pki}
mkdir -p "$out"
chmod 700 "$out"
cd "$out"

# The authority: the bus's root of trust. Keep authority.key offline.
$JUNCTION keygen authority.key
$JUNCTION cert issue --role authority --key authority.key --out authority.cert --days 3650

# One key and one junction certificate per junction id.
for id in 1 2 3; do
  $JUNCTION keygen "junction-$id.key"
  $JUNCTION cert issue --role junction --junction-id "$id" \
    --key "junction-$id.key" \
    --issuer-key authority.key --issuer-cert authority.cert \
    --out "junction-$id.cert"
done

# A service allowed to register one name, anywhere on the bus.
$JUNCTION keygen echo.key
$JUNCTION cert issue --role service --name org.example.echo \
  --key echo.key --issuer-key authority.key --issuer-cert authority.cert \
  --out echo.cert

echo "made the authority, junctions 1-3 and the service org.example.echo in $PWD"
