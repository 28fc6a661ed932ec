# The webserver example's test, written for the NixOS test driver's Python
# API and run unchanged by `vmlab test network.json test.py` (docs/testing.md).
start_all()
server.wait_for_open_port(80)

with subtest("the client fetches the server's page by name"):
    page = client.wait_until_succeeds("wget -qO- http://server/")
    assert "Hello from the vmlab web server" in page, page
    print(f"the client fetched: {page.strip()}")

with subtest("the client fetches it by IPv4 and IPv6 address"):
    # NixOS numbering: machines in name order, client 1, server 2.
    for url in ["http://192.168.1.2/", "http://[2001:db8:1::2]/"]:
        assert client.succeed(f"wget -qO- {url}") == page, url

with subtest("nothing answers on a port nobody serves"):
    client.fail("wget -qO- http://server:8080/")

with subtest("the page is copied out of the server"):
    server.succeed("test -s /var/www/index.html")
    server.copy_from_vm("/var/www/index.html", "server")
