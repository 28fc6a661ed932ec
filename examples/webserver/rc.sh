#!/bin/sh
# Boot script of the example's default guest: the machine named "server"
# serves /var/www over HTTP on port 80 (IPv4 and IPv6).
if [ "$(hostname)" = server ]; then
  busybox httpd -p 80 -h /var/www
fi
