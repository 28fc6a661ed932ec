#!/bin/sh
# The webserver example's test as a shell script, written with vmlab's client
# subcommands: `vmlab test network.json test.sh` (docs/testing.md).
set -eu

vmlab start-all
vmlab wait-for-open-port server 80

vmlab subtest begin "the client fetches the server's page by name"
page=$(vmlab wait-until-succeeds client -- wget -qO- http://server/)
case "$page" in
  *"Hello from the vmlab web server"*) ;;
  *) echo "unexpected page: $page" >&2; exit 1 ;;
esac
echo "the client fetched: $page"
vmlab subtest end

vmlab subtest begin "the client fetches it by IPv4 and IPv6 address"
# NixOS numbering: machines in name order, client 1, server 2.
for url in http://192.168.1.2/ 'http://[2001:db8:1::2]/'; do
  test "$(vmlab succeed client -- wget -qO- "$url")" = "$page"
done
vmlab subtest end

vmlab subtest begin "nothing answers on a port nobody serves"
vmlab fail client -- wget -qO- http://server:8080/
vmlab subtest end
