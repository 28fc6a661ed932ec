# The webserver example's test, written for the NixOS test driver's Python
# API and run unchanged by `vmlab test network.json test.py` (docs/testing.md).
start_all()
server.wait_for_open_port(80)

with subtest("the client fetches the server's page by name"):
    page = client.wait_until_succeeds("wget -qO- http://server/")
    assert "Hello from the vmlab web server" in page, page

with subtest("nothing answers on a port nobody serves"):
    client.fail("wget -qO- http://server:8080/")

with subtest("the page is copied out of the server"):
    server.succeed("test -s /var/www/index.html")
    server.copy_from_vm("/var/www/index.html", "server")
