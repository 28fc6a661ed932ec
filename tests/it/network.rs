//! What the network gives the guests, on real VMs: addressing as planned,
//! reachability by host name, IPv4 and IPv6 over a vlan, and isolation
//! between vlans (frames of one vlan never reach another's switch).

use std::path::Path;
use std::sync::Arc;

use serde_json::json;

use vmlab::accel::{self, Accel};
use vmlab::driver::{log::Log, machine::DrivenMachine};
use vmlab::runtime::{load_plan, Network, Session};

use crate::support::{processes_mentioning, repo_root, run, vmlab, webserver_guest};

/// Builds the network `nodes` (name → vlans) on the webserver example's
/// default guest into `tmp/out`.
fn build_on_webserver_guest(tmp: &Path, nodes: &[(&str, &[u8])]) -> std::path::PathBuf {
    let guest = webserver_guest();
    let nodes: serde_json::Map<String, serde_json::Value> = nodes
        .iter()
        .map(|(name, vlans)| {
            let node =
                json!({"kernel": guest.join("kernel"), "initrd": guest.join("initrd"), "memory": 128, "vlans": vlans});
            (name.to_string(), node)
        })
        .collect();
    let spec = tmp.join("spec.json");
    std::fs::write(&spec, json!({"name": "vlans", "nodes": nodes}).to_string()).unwrap();
    let out = tmp.join("out");
    let built = run(vmlab().arg("build").arg(&spec).arg("--out").arg(&out));
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    out
}

fn stdout(machine: &mut DrivenMachine, command: &str) -> String {
    String::from_utf8(machine.succeed(&[command.to_owned()], None).unwrap()).unwrap()
}

/// `server` on vlan 1, `client` on vlans 1 and 2, `island` on vlan 2 only
/// (numbers 3, 1, 2). The client fetches the server's page over vlan 1 by
/// name, IPv4 and IPv6; `island` reaches `client` over vlan 2 but not
/// `server`, even with an address of vlan 1's subnet on its own NIC: only
/// the switches, not routing, keep it out.
#[test]
fn machines_reach_each_other_on_a_shared_vlan_and_never_across_vlans() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = build_on_webserver_guest(tmp.path(), &[("server", &[1]), ("client", &[1, 2]), ("island", &[2])]);
    let plan = load_plan(&dir).unwrap();
    let accel = accel::decide(Accel::Auto, &accel::probe()).unwrap().accel;
    let network = Network::start(&dir, plan.clone(), Session::create(&plan, false).unwrap(), accel).unwrap();
    let session = network.session().path().to_owned();
    let log = Arc::new(Log::new(Box::new(std::io::sink()), false, None));
    let mut machines: Vec<DrivenMachine> = plan
        .machines
        .iter()
        .map(|m| {
            let interfaces = m.interfaces.iter().map(|i| (i.name.clone(), i.vlan)).collect();
            let vm = Box::new(network.machine(&m.name).unwrap().clone());
            DrivenMachine::new(&m.name, interfaces, vm, tmp.path(), log.clone())
        })
        .collect();
    // Boot all three at once: TCG boots are CPU-bound, but most of a boot is waiting.
    std::thread::scope(|s| {
        for m in machines.iter_mut() {
            s.spawn(|| m.start().and_then(|()| m.wait_for_boot()).unwrap());
        }
    });
    let [client, island, server] = &mut machines[..] else { panic!("three machines in number order") };

    assert_eq!(stdout(server, "hostname"), "server\n");
    assert_eq!(stdout(client, "ip -o -4 addr show dev eth2 | awk '{print $4}'"), "192.168.2.1/24\n");
    let hosts = stdout(client, "cat /etc/hosts");
    assert!(hosts.ends_with(&plan.hosts), "{hosts:?} does not end with the plan's {:?}", plan.hosts);

    let page = std::fs::read_to_string(repo_root().join("examples/webserver/www/index.html")).unwrap();
    for url in ["http://server/", "http://192.168.1.3/", "http://[2001:db8:1::3]/"] {
        assert_eq!(stdout(client, &format!("wget -q -O - {url}")), page, "{url}");
    }

    // The pings below fail only for the vlans: the same pings succeed within one.
    stdout(client, "ping -c 1 -W 5 192.168.1.3 && ping -c 1 -W 5 2001:db8:1::3");
    stdout(island, "ping -c 1 -W 5 192.168.2.1 && ping -c 1 -W 5 2001:db8:2::1");
    stdout(island, "ip addr add 192.168.1.99/24 dev eth1 && ip addr add 2001:db8:1::99/64 dev eth1");
    // A tentative address could not send, which would make the check below pass for the wrong reason.
    island
        .wait_until("! ip -6 addr show dev eth1 | grep -q tentative", true, std::time::Duration::from_secs(30))
        .unwrap();
    for target in ["192.168.1.3", "2001:db8:1::3"] {
        let out = island.execute(&format!("ping -c 2 -W 2 {target}"), None).unwrap();
        assert_ne!(out.status, 0, "island (vlan 2) reached server (vlan 1) at {target}");
    }
    // And the server never saw a frame from vlan 2: no neighbour entry for island's address.
    let neighbours = stdout(server, "ip neigh show");
    assert!(!neighbours.contains("192.168.1.99") && !neighbours.contains("2001:db8:1::99"), "{neighbours}");

    drop(machines);
    network.stop();
    assert_eq!(processes_mentioning(&session), []);
}
