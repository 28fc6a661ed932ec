//! The network spec: JSON (as `nix eval --json` writes it) → typed, validated [`Spec`].
//!
//! Validation is by hand rather than by serde derive so every error names the
//! node and the field (`node "server": vlans: 300 is out of range 0..=255`)
//! and unknown keys are rejected with their place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use serde_json::error::Category;
use serde_json::Value;

mod json;

use json::{int_in, kind, list, path, string, Fields, UniqueKeys};

/// The most machines a network may have: machine numbers are the last octet
/// of 192.168.v.n (plan/addr.rs).
pub const MAX_MACHINES: usize = 254;

pub const DEFAULT_NETWORK_NAME: &str = "network";
pub const DEFAULT_MEMORY_MIB: u32 = 256;
pub const DEFAULT_VLANS: [u8; 1] = [1];

#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub name: String,
    /// Sorted byte-wise by name, as Nix's `attrNames`: the order machines are numbered in.
    pub nodes: BTreeMap<String, Node>,
    pub qemu: Option<PathBuf>,
    pub vde_switch: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub vlans: Vec<u8>,
    pub memory: u32,
    pub cpus: u32,
    pub boot: Boot,
    pub forward_ports: Vec<ForwardPort>,
    pub qemu_options: Vec<String>,
    /// `vmlab snapshot` waits until this command succeeds in the guest
    /// before saving it (docs/snapshots.md).
    pub snapshot_ready: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Boot {
    /// Direct kernel boot.
    Kernel { kernel: PathBuf, initrd: Option<PathBuf>, cmdline: String },
    /// A nixpkgs qemu-vm.nix style start script (`system.build.vm`'s `bin/run-*-vm`).
    StartScript(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ForwardPort {
    pub host: u16,
    pub guest: u16,
}

/// Parses and validates a spec. Relative paths are taken relative to `base`
/// (the spec file's directory) and made absolute, so the run scripts work from anywhere.
pub fn parse(text: &str, base: &Path) -> Result<Spec> {
    let UniqueKeys(value) = serde_json::from_str(text).map_err(|e| match e.classify() {
        Category::Data => anyhow!("spec: {e}"),
        _ => anyhow!("spec is not valid JSON: {e}"),
    })?;
    let top = value.as_object().ok_or_else(|| anyhow!("spec must be a JSON object, not {}", kind(&value)))?;
    let mut fields = Fields::new(top, String::new());
    let name = match fields.take("name") {
        None => DEFAULT_NETWORK_NAME.to_string(),
        Some(v) => network_name(v).map_err(|e| anyhow!("name: {e}"))?,
    };
    let nodes_value = fields.take("nodes").ok_or_else(|| anyhow!("nodes: missing (an object of machines)"))?;
    let qemu = fields.take("qemu").map(|v| path(v, base)).transpose().map_err(|e| anyhow!("qemu: {e}"))?;
    let vde_switch =
        fields.take("vdeSwitch").map(|v| path(v, base)).transpose().map_err(|e| anyhow!("vdeSwitch: {e}"))?;
    fields.finish()?;

    let nodes_map =
        nodes_value.as_object().ok_or_else(|| anyhow!("nodes: expected an object, not {}", kind(nodes_value)))?;
    if nodes_map.is_empty() {
        bail!("nodes: a network needs at least one machine");
    }
    if nodes_map.len() > MAX_MACHINES {
        bail!("nodes: {} machines, more than the {MAX_MACHINES} a network can number", nodes_map.len());
    }
    let mut nodes = BTreeMap::new();
    for (node_name, v) in nodes_map {
        check_node_name(node_name)?;
        let node = node(node_name, v, base)?;
        nodes.insert(node_name.clone(), node);
    }
    check_host_ports_unique(&nodes)?;
    Ok(Spec { name, nodes, qemu, vde_switch })
}

fn node(name: &str, value: &Value, base: &Path) -> Result<Node> {
    let place = format!("node {name:?}: ");
    let obj = value.as_object().ok_or_else(|| anyhow!("{place}expected an object, not {}", kind(value)))?;
    let mut f = Fields::new(obj, place.clone());
    let err = |field: &str, e: anyhow::Error| anyhow!("{place}{field}: {e}");

    let vlans = match f.take("vlans") {
        None => DEFAULT_VLANS.to_vec(),
        Some(v) => vlans(v).map_err(|e| err("vlans", e))?,
    };
    let memory = match f.take("memory") {
        None => DEFAULT_MEMORY_MIB,
        Some(v) => int_in(v, 16, 1 << 20).map_err(|e| err("memory", e))?,
    };
    let cpus = match f.take("cpus") {
        None => 1,
        Some(v) => int_in(v, 1, 255).map_err(|e| err("cpus", e))?,
    };
    let kernel = f.take("kernel").map(|v| path(v, base)).transpose().map_err(|e| err("kernel", e))?;
    let initrd = f.take("initrd").map(|v| path(v, base)).transpose().map_err(|e| err("initrd", e))?;
    let cmdline = f.take("cmdline").map(string).transpose().map_err(|e| err("cmdline", e))?;
    let start_script = f.take("startScript").map(|v| path(v, base)).transpose().map_err(|e| err("startScript", e))?;
    let forward_ports = match f.take("forwardPorts") {
        None => Vec::new(),
        Some(v) => forward_ports(v).map_err(|e| err("forwardPorts", e))?,
    };
    let qemu_options = match f.take("qemuOptions") {
        None => Vec::new(),
        Some(v) => {
            list(v).and_then(|l| l.iter().map(string).collect::<Result<_>>()).map_err(|e| err("qemuOptions", e))?
        }
    };
    let snapshot_ready = f.take("snapshotReady").map(string).transpose().map_err(|e| err("snapshotReady", e))?;
    f.finish()?;

    let boot = match (kernel, start_script) {
        (Some(kernel), None) => Boot::Kernel { kernel, initrd, cmdline: cmdline.unwrap_or_default() },
        (None, Some(script)) => {
            if initrd.is_some() || cmdline.is_some() {
                bail!("{place}initrd and cmdline go with kernel, not with startScript");
            }
            Boot::StartScript(script)
        }
        (Some(_), Some(_)) => bail!("{place}kernel and startScript both given; a machine boots one way"),
        (None, None) => bail!("{place}needs kernel (direct boot) or startScript (a NixOS VM script)"),
    };
    Ok(Node { vlans, memory, cpus, boot, forward_ports, qemu_options, snapshot_ready })
}

fn vlans(v: &Value) -> Result<Vec<u8>> {
    let mut out: Vec<u8> = Vec::new();
    for item in list(v)? {
        let vlan = int_in(item, 0, 255)? as u8;
        if out.contains(&vlan) {
            bail!("vlan {vlan} is listed twice");
        }
        out.push(vlan);
    }
    Ok(out)
}

fn forward_ports(v: &Value) -> Result<Vec<ForwardPort>> {
    list(v)?
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let obj = item
                .as_object()
                .ok_or_else(|| anyhow!("entry {i}: expected an object {{\"host\": …, \"guest\": …}}"))?;
            let mut f = Fields::new(obj, format!("entry {i}: "));
            let port = |v: Option<&Value>, which: &str| -> Result<u16> {
                let v = v.ok_or_else(|| anyhow!("entry {i}: {which}: missing"))?;
                Ok(int_in(v, 1, 65535).map_err(|e| anyhow!("entry {i}: {which}: {e}"))? as u16)
            };
            let host = port(f.take("host"), "host")?;
            let guest = port(f.take("guest"), "guest")?;
            f.finish()?;
            Ok(ForwardPort { host, guest })
        })
        .collect()
}

fn check_host_ports_unique(nodes: &BTreeMap<String, Node>) -> Result<()> {
    let mut seen: BTreeMap<u16, &str> = BTreeMap::new();
    for (name, node) in nodes {
        for fwd in &node.forward_ports {
            if let Some(other) = seen.insert(fwd.host, name) {
                bail!("node {name:?}: forwardPorts: host port {} is also forwarded by node {other:?}", fwd.host);
            }
        }
    }
    Ok(())
}

/// NixOS's `networking.hostName` rule: letters, digits, `-` and `_`, at most
/// 63 characters, starting and ending with a letter or digit.
fn check_node_name(name: &str) -> Result<()> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric();
    if !ok {
        bail!(
            "node {name:?}: not a valid host name (letters, digits, '-' and '_', at most 63, \
             starting and ending with a letter or digit)"
        );
    }
    Ok(())
}

fn network_name(v: &Value) -> Result<String> {
    let s = string(v)?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        bail!("{s:?} is not a valid network name (letters, digits, '.', '_' and '-')");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_value(v: Value) -> Result<Spec> {
        parse(&v.to_string(), Path::new("/specs"))
    }

    fn one_node(node: Value) -> Value {
        json!({"nodes": {"server": node}})
    }

    #[test]
    fn defaults_and_paths() {
        let spec = parse_value(one_node(json!({"kernel": "guest/kernel", "initrd": "/abs/initrd"}))).unwrap();
        assert_eq!(spec.name, "network");
        let node = &spec.nodes["server"];
        assert_eq!(node.vlans, vec![1]);
        assert_eq!(node.memory, 256);
        assert_eq!(node.cpus, 1);
        assert_eq!(
            node.boot,
            Boot::Kernel {
                kernel: PathBuf::from("/specs/guest/kernel"),
                initrd: Some(PathBuf::from("/abs/initrd")),
                cmdline: String::new()
            }
        );
    }

    #[test]
    fn nodes_sort_bytewise_like_nix_attr_names() {
        let k = json!({"kernel": "/k"});
        let spec = parse_value(json!({"nodes": {"b": k, "a": k, "B": k, "a_1": k, "a-1": k}})).unwrap();
        let names: Vec<&str> = spec.nodes.keys().map(String::as_str).collect();
        assert_eq!(names, ["B", "a", "a-1", "a_1", "b"]);
    }

    #[test]
    fn errors_name_the_node_and_field() {
        let k = "/k";
        for (spec, want) in [
            (json!([]), "spec must be a JSON object, not a list"),
            (json!({}), "nodes: missing (an object of machines)"),
            (json!({"nodes": {}}), "nodes: a network needs at least one machine"),
            (json!({"nodes": [], "name": "x"}), "nodes: expected an object, not a list"),
            (
                json!({"nodes": {"a": {"kernel": k}}, "nmae": "x"}),
                "unknown field \"nmae\" (known: name, nodes, qemu, vdeSwitch)",
            ),
            (json!({"nodes": {"a": {"kernel": k}}, "name": "a b"}), "name: \"a b\" is not a valid network name"),
            (one_node(json!({"kernel": k, "vlans": [300]})), "node \"server\": vlans: 300 is out of range 0..=255"),
            (one_node(json!({"kernel": k, "vlans": [-1]})), "node \"server\": vlans: -1 is out of range 0..=255"),
            (one_node(json!({"kernel": k, "vlans": [1, 1]})), "node \"server\": vlans: vlan 1 is listed twice"),
            (one_node(json!({"kernel": k, "vlans": 1})), "node \"server\": vlans: expected a list, not a number"),
            (one_node(json!({"kernel": k, "vlans": [1.5]})), "node \"server\": vlans: 1.5 is not a whole number"),
            (
                one_node(json!({"kernel": k, "memory": "1G"})),
                "node \"server\": memory: expected a whole number, not a string",
            ),
            (one_node(json!({"kernel": k, "memory": 8})), "node \"server\": memory: 8 is out of range 16..=1048576"),
            (one_node(json!({"kernel": k, "cpus": 0})), "node \"server\": cpus: 0 is out of range 1..=255"),
            (one_node(json!({"kernel": k, "vlan": [1]})), "node \"server\": unknown field \"vlan\""),
            (one_node(json!({"kernel": 3})), "node \"server\": kernel: expected a string, not a number"),
            (one_node(json!({"kernel": ""})), "node \"server\": kernel: empty path"),
            (one_node(json!({})), "node \"server\": needs kernel (direct boot) or startScript"),
            (one_node(json!({"kernel": k, "startScript": "/s"})), "node \"server\": kernel and startScript both given"),
            (
                one_node(json!({"startScript": "/s", "cmdline": "x"})),
                "node \"server\": initrd and cmdline go with kernel",
            ),
            (
                one_node(json!({"kernel": k, "forwardPorts": [{"host": 0, "guest": 80}]})),
                "node \"server\": forwardPorts: entry 0: host: 0 is out of range 1..=65535",
            ),
            (
                one_node(json!({"kernel": k, "forwardPorts": [{"host": 80}]})),
                "node \"server\": forwardPorts: entry 0: guest: missing",
            ),
            (
                one_node(json!({"kernel": k, "forwardPorts": [{"host": 80, "guest": 80, "proto": "udp"}]})),
                "node \"server\": forwardPorts: entry 0: unknown field \"proto\"",
            ),
            (
                one_node(json!({"kernel": k, "qemuOptions": ["-a", 1]})),
                "node \"server\": qemuOptions: expected a string, not a number",
            ),
            (
                one_node(json!({"kernel": k, "qemuOptions": "-a"})),
                "node \"server\": qemuOptions: expected a list, not a string",
            ),
            (
                one_node(json!({"kernel": k, "qemuOptions": ["-a", "b\0"]})),
                "node \"server\": qemuOptions: contains a NUL byte",
            ),
            (one_node(json!({"kernel": k, "cmdline": "quiet\0x"})), "node \"server\": cmdline: contains a NUL byte"),
            (one_node(json!({"kernel": "/k\0"})), "node \"server\": kernel: contains a NUL byte"),
            (one_node(json!({"startScript": "/s\0"})), "node \"server\": startScript: contains a NUL byte"),
            (json!({"nodes": {"a": {"kernel": k}}, "vdeSwitch": "/v\0"}), "vdeSwitch: contains a NUL byte"),
            (json!({"nodes": {"a": {"kernel": k}}, "name": "n\0"}), "name: contains a NUL byte"),
            (one_node(json!("x")), "node \"server\": expected an object, not a string"),
            (
                json!({"nodes": {"a": {"kernel": k, "forwardPorts": [{"host": 80, "guest": 1}]}, "b": {"kernel": k, "forwardPorts": [{"host": 80, "guest": 2}]}}}),
                "node \"b\": forwardPorts: host port 80 is also forwarded by node \"a\"",
            ),
            (json!({"nodes": {"-a": {"kernel": k}}}), "node \"-a\": not a valid host name"),
            (json!({"nodes": {"a.b": {"kernel": k}}}), "node \"a.b\": not a valid host name"),
            (json!({"nodes": {"": {"kernel": k}}}), "node \"\": not a valid host name"),
            (json!({"nodes": {"a": {"kernel": k}}, "qemu": false}), "qemu: expected a string, not a boolean"),
        ] {
            let err = format!("{:#}", parse_value(spec.clone()).expect_err(&spec.to_string()));
            assert!(err.starts_with(want), "spec {spec}\n  got:  {err}\n  want: {want}");
        }
    }

    #[test]
    fn invalid_json_is_one_line() {
        let err = parse("{\"nodes\": ", Path::new("/")).unwrap_err().to_string();
        assert!(err.starts_with("spec is not valid JSON: EOF while parsing"), "{err}");
        assert!(!err.contains('\n'));
    }

    /// serde_json alone would keep the last of two equal keys.
    #[test]
    fn a_key_given_twice_in_any_object_is_refused() {
        for (text, key) in [
            (r#"{"nodes": {"a": {"kernel": "/k"}, "a": {"kernel": "/j"}}}"#, "a"),
            (r#"{"name": "x", "nodes": {"a": {"kernel": "/k"}}, "name": "y"}"#, "name"),
            (r#"{"nodes": {"a": {"kernel": "/k", "kernel": "/j"}}}"#, "kernel"),
            (r#"{"nodes": {"a": {"kernel": "/k", "forwardPorts": [{"host": 1, "guest": 2, "host": 3}]}}}"#, "host"),
            (r#"{"nodes": {"a": {"kernel": "/k"}}, "x": [[{"y": {"z": 1, "z": 1}}]]}"#, "z"),
        ] {
            let err = parse(text, Path::new("/")).unwrap_err().to_string();
            let want = format!("spec: key {key:?} is given twice in one object at line 1 column");
            assert!(err.starts_with(&want), "{text}\n  got:  {err}\n  want: {want}");
        }
    }

    #[test]
    fn machine_count_limit() {
        let node = json!({"kernel": "/k"});
        let nodes = |n: usize| Value::Object((0..n).map(|i| (format!("m{i}"), node.clone())).collect());
        assert_eq!(parse_value(json!({"nodes": nodes(254)})).unwrap().nodes.len(), 254);
        let err = parse_value(json!({"nodes": nodes(255)})).unwrap_err().to_string();
        assert_eq!(err, "nodes: 255 machines, more than the 254 a network can number");
    }

    #[test]
    fn longest_valid_node_name() {
        let name = format!("a{}b", "-".repeat(61));
        assert!(parse_value(json!({"nodes": {name: {"kernel": "/k"}}})).is_ok());
        let name = format!("a{}b", "-".repeat(62));
        assert!(parse_value(json!({"nodes": {name: {"kernel": "/k"}}})).is_err());
    }
}
