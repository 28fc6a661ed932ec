#!/bin/sh
# nc for the default guest: busybox's nc, plus -z, which it lacks and NixOS
# test scripts use (nixpkgs' wait_for_open_port runs `nc -z ADDR PORT`):
# connect, send nothing, and exit 0 when something listened, 1 when not.
# -w SECS bounds the connect (2 s unless given). Anything else goes to
# busybox's nc unchanged.
zero=
wait=2
for arg in "$@"; do
    case $arg in
        -z) zero=1 ;;
    esac
done
[ -n "$zero" ] || exec busybox nc "$@"
host=
port=
while [ $# -gt 0 ]; do
    case $1 in
        -z | -v | -n | -4 | -6) ;;
        -w) wait=$2; shift ;;
        -w*) wait=${1#-w} ;;
        -*) echo "nc: -z with $1 is not supported here" >&2; exit 2 ;;
        *) if [ -z "$host" ]; then host=$1; else port=$1; fi ;;
    esac
    shift
done
if [ -z "$host" ] || [ -z "$port" ]; then
    echo "usage: nc -z [-w SECS] HOST PORT" >&2
    exit 2
fi
exec busybox nc -w "$wait" "$host" "$port" -e true </dev/null >/dev/null 2>&1
