# The webserver example with the Nix library (docs/nix.md): two machines on
# the default guest; `server` serves www/ on port 80, forwarded to the host.
# lab: the vmlab library (the flake's lib, or nix/host.nix on Debian).
{ lab, port ? 8081, memory ? 256, testArgs ? { } }:
let
  network = {
    name = "webserver";
    guest = {
      rc = ./rc.sh;
      files."/var/www" = ./www;
    };
    nodes = {
      # vmlab's node fields: the network's default guest (`guest` above).
      server.vmlabNode = { guest = true; inherit memory; cmdline = "quiet"; forwardPorts = [{ host = port; guest = 80; }]; };
      client.vmlabNode = { guest = true; inherit memory; cmdline = "quiet"; };
    };
  };
in
{
  # nix build .#vms && ./result/bin/run-vms
  vms = lab.buildVirtualNetwork network;

  # The client fetches the server's page by name, over IPv4 and IPv6.
  test = lab.runTest (network // {
    # A function when the script needs an address: `machines` are the
    # plan's machines by name (vmlab's numbering, computed in Nix).
    testScript = { machines, ... }: ''
      start_all()
      server.wait_for_open_port(80)
      with subtest("the client fetches the page by name"):
          page = client.succeed("wget -q -O - http://server/")
          assert "Hello from the vmlab web server" in page, page
      with subtest("and by IPv6 address"):
          client.succeed("wget -q -O - 'http://[${machines.server.primaryIPv6}]/'")
    '';
  } // testArgs);
}
