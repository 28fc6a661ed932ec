#!/bin/sh
# The webserver example end to end, as README's first command runs it: builds
# the default guest with this example's boot script and pages, then runs the
# example's test (test.py) against network.json with `vmlab test`. The client
# fetches the server's page over vlan 1; the log shows what it fetched.
#
# Usage: examples/webserver/run.sh [VMLAB] [REPORT_DIR]
#   VMLAB       the vmlab executable (default: vmlab on PATH)
#   REPORT_DIR  where junit.xml, vmlab.log and the serial logs go (default: webserver-report)
set -eu
vmlab=${1:-vmlab}
report=${2:-webserver-report}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/vmlab-example.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
"$vmlab" guest --out "$work/guest" --rc "$here/rc.sh" --add "$here/www:/var/www"
# network.json names guest/kernel and guest/initrd beside itself.
cp "$here/network.json" "$work/network.json"
"$vmlab" test "$work/network.json" "$here/test.py" --out "$report"
