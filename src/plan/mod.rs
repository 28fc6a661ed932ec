//! The validated plan: every machine's number, interfaces and addresses, and
//! the network's hosts file. Pure: a [`Spec`] in, a [`Plan`] out.
//!
//! `plan.json` is this type serialised; `vmlab up` and `vmlab test` read it back.

pub mod addr;
pub mod qemu;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spec::{ForwardPort, Spec};
use addr::MacAddr;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub name: String,
    /// Every vlan some machine is on, sorted, each once: one switch each.
    pub vlans: Vec<u8>,
    /// The hosts file every machine gets (after its localhost lines).
    pub hosts: String,
    /// In number order.
    pub machines: Vec<MachinePlan>,
    /// Resolved when building, so the run scripts never search PATH.
    pub qemu: PathBuf,
    pub vde_switch: PathBuf,
}

/// What the plan fixes for one machine: its number, NICs and addresses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachinePlan {
    pub name: String,
    /// 1..=254, by byte-wise sorted name.
    pub number: u8,
    /// `eth1`, `eth2`, … in the order of the spec's `vlans`.
    pub interfaces: Vec<Interface>,
    /// eth1's addresses; `null` for a machine on no vlan.
    #[serde(rename = "primaryIPv4")]
    pub primary_ipv4: Option<Ipv4Addr>,
    #[serde(rename = "primaryIPv6")]
    pub primary_ipv6: Option<String>,
    pub memory: u32,
    pub cpus: u32,
    pub forward_ports: Vec<ForwardPort>,
    /// The spec's `snapshotReady`; absent when not given, so plans without it
    /// read as they always did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_ready: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    pub vlan: u8,
    pub mac: MacAddr,
    pub ipv4: Ipv4Addr,
    pub ipv4_prefix_length: u8,
    pub ipv6: String,
    pub ipv6_prefix_length: u8,
}

/// Numbers the machines and assigns their addresses as nixpkgs' network.nix does.
/// `qemu` and `vde_switch` are the tools' resolved paths (resolving is I/O, done by the caller).
pub fn plan(spec: &Spec, qemu: PathBuf, vde_switch: PathBuf) -> Plan {
    let machines: Vec<MachinePlan> = spec
        .nodes
        .iter()
        .zip(1u8..)
        .map(|((name, node), number)| {
            let interfaces: Vec<Interface> = node
                .vlans
                .iter()
                .enumerate()
                .map(|(i, &vlan)| Interface {
                    name: format!("eth{}", i + 1),
                    vlan,
                    mac: MacAddr::for_vlan_nic(vlan, number),
                    ipv4: addr::ipv4(vlan, number),
                    ipv4_prefix_length: addr::IPV4_PREFIX_LENGTH,
                    ipv6: addr::ipv6(vlan, number),
                    ipv6_prefix_length: addr::IPV6_PREFIX_LENGTH,
                })
                .collect();
            MachinePlan {
                name: name.clone(),
                number,
                primary_ipv4: interfaces.first().map(|i| i.ipv4),
                primary_ipv6: interfaces.first().map(|i| i.ipv6.clone()),
                interfaces,
                memory: node.memory,
                cpus: node.cpus,
                forward_ports: node.forward_ports.clone(),
                snapshot_ready: node.snapshot_ready.clone(),
            }
        })
        .collect();
    let mut vlans: Vec<u8> = spec.nodes.values().flat_map(|n| n.vlans.iter().copied()).collect();
    vlans.sort_unstable();
    vlans.dedup();
    Plan { name: spec.name.clone(), vlans, hosts: hosts_file(&machines), machines, qemu, vde_switch }
}

/// `<ipv4> <name>` then `<ipv6> <name>` for each machine with addresses, in number order.
fn hosts_file(machines: &[MachinePlan]) -> String {
    let mut out = String::new();
    for m in machines {
        if let (Some(v4), Some(v6)) = (&m.primary_ipv4, &m.primary_ipv6) {
            out += &format!("{v4} {name}\n{v6} {name}\n", name = m.name);
        }
    }
    out
}

impl Plan {
    pub fn machine(&self, name: &str) -> Option<&MachinePlan> {
        self.machines.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec;
    use serde_json::json;
    use std::path::Path;

    fn plan_of(nodes: serde_json::Value) -> Plan {
        let spec = spec::parse(&json!({ "nodes": nodes }).to_string(), Path::new("/")).unwrap();
        plan(&spec, "/bin/qemu".into(), "/bin/vde_switch".into())
    }

    #[test]
    fn numbering_interfaces_and_primaries() {
        let k = json!({"kernel": "/k"});
        let p = plan_of(json!({
            "server": {"kernel": "/k", "vlans": [2, 10]},
            "client": k,
            "lonely": {"kernel": "/k", "vlans": []},
        }));
        /// A machine's name and number, and per interface its name, vlan, MAC and addresses.
        type Summary<'a> = (&'a str, u8, Vec<(&'a str, u8, String, String, String)>);
        let summary: Vec<Summary> = p
            .machines
            .iter()
            .map(|m| {
                let ifs = m
                    .interfaces
                    .iter()
                    .map(|i| (i.name.as_str(), i.vlan, i.mac.to_string(), i.ipv4.to_string(), i.ipv6.clone()))
                    .collect();
                (m.name.as_str(), m.number, ifs)
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "client",
                    1,
                    vec![("eth1", 1, "52:54:00:12:01:01".into(), "192.168.1.1".into(), "2001:db8:1::1".into())]
                ),
                ("lonely", 2, vec![]),
                (
                    "server",
                    3,
                    vec![
                        ("eth1", 2, "52:54:00:12:02:03".into(), "192.168.2.3".into(), "2001:db8:2::3".into()),
                        ("eth2", 10, "52:54:00:12:0a:03".into(), "192.168.10.3".into(), "2001:db8:10::3".into()),
                    ]
                ),
            ]
        );
        assert_eq!(p.vlans, vec![1, 2, 10]);
        let lonely = p.machine("lonely").unwrap();
        assert_eq!((lonely.primary_ipv4, lonely.primary_ipv6.as_deref()), (None, None));
        let server = p.machine("server").unwrap();
        assert_eq!(server.primary_ipv4, Some(Ipv4Addr::new(192, 168, 2, 3)));
        assert_eq!(p.hosts, "192.168.1.1 client\n2001:db8:1::1 client\n192.168.2.3 server\n2001:db8:2::3 server\n");
    }

    #[test]
    fn machine_254_gets_last_octet_254() {
        let nodes: serde_json::Map<String, serde_json::Value> =
            (0..254).map(|i| (format!("m{i:03}"), json!({"kernel": "/k", "vlans": [255]}))).collect();
        let p = plan_of(serde_json::Value::Object(nodes));
        let last = p.machines.last().unwrap();
        assert_eq!((last.name.as_str(), last.number), ("m253", 254));
        assert_eq!(last.interfaces[0].mac.to_string(), "52:54:00:12:ff:fe");
        assert_eq!(last.interfaces[0].ipv4.to_string(), "192.168.255.254");
        assert_eq!(last.interfaces[0].ipv6, "2001:db8:255::254");
    }

    #[test]
    fn plan_json_round_trips_with_contract_field_names() {
        let p = plan_of(json!({"a": {"kernel": "/k"}, "b": {"kernel": "/k", "vlans": []}}));
        let v = serde_json::to_value(&p).unwrap();
        for key in ["name", "vlans", "hosts", "machines"] {
            assert!(v.get(key).is_some(), "plan.json lacks {key}");
        }
        let a = &v["machines"][0];
        for key in ["name", "number", "interfaces", "primaryIPv4", "primaryIPv6"] {
            assert!(a.get(key).is_some(), "machine lacks {key}");
        }
        assert_eq!(v["machines"][1]["primaryIPv4"], serde_json::Value::Null);
        for key in ["name", "vlan", "mac", "ipv4", "ipv6"] {
            assert!(a["interfaces"][0].get(key).is_some(), "interface lacks {key}");
        }
        assert_eq!(serde_json::from_value::<Plan>(v).unwrap(), p);
    }
}
