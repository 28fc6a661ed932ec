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
vmlab subtest end

vmlab subtest begin "nothing answers on a port nobody serves"
vmlab fail client -- wget -qO- http://server:8080/
vmlab subtest end
