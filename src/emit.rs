//! What `vmlab plan` and `vmlab build` write: the plan as JSON, the guest
//! configurations and the run scripts. Rendering is pure; [`load`] and
//! [`write_build`] are the I/O edge.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::layout;
use crate::plan::qemu::{self, Opt};
use crate::plan::{self, MachinePlan, Plan};
use crate::shell::{quote, Word};
use crate::spec::{self, Boot, Node, Spec};

/// A spec read and validated, its files checked, its tools resolved.
pub struct Loaded {
    pub spec: Spec,
    pub plan: Plan,
}

/// The largest spec read. Real specs are kilobytes; the cap makes a wrong
/// path (`/dev/zero`, a disk image) a quick error rather than all the memory.
pub const MAX_SPEC_BYTES: u64 = 16 << 20;

/// Reads the spec (`-` is standard input), validates it, checks the files it
/// names exist, and plans it.
pub fn load(path: &Path) -> Result<Loaded> {
    let (text, base) = if path == Path::new("-") {
        let text = read_spec(std::io::stdin().lock(), "the spec on standard input")?;
        (text, std::env::current_dir().context("cannot find the current directory")?)
    } else {
        let what = format!("spec {path:?}");
        let file = fs::File::open(path).with_context(|| format!("cannot read {what}"))?;
        let text = read_spec(file, &what)?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base = fs::canonicalize(dir).with_context(|| format!("cannot resolve {dir:?}"))?;
        (text, base)
    };
    let spec = spec::parse(&text, &base)?;
    for (name, node) in &spec.nodes {
        check_files(name, node)?;
    }
    let qemu = resolve_tool(spec.qemu.as_deref(), "qemu", "qemu-system-x86_64", "qemu-system-x86")?;
    let vde_switch = resolve_tool(spec.vde_switch.as_deref(), "vdeSwitch", "vde_switch", "vde2")?;
    let plan = plan::plan(&spec, qemu, vde_switch);
    Ok(Loaded { spec, plan })
}

/// Reads all of `source` as text, refusing more than [`MAX_SPEC_BYTES`]:
/// one byte more is read to tell a spec of exactly that size from a bigger one.
fn read_spec(source: impl Read, what: &str) -> Result<String> {
    let mut bytes = Vec::new();
    source.take(MAX_SPEC_BYTES + 1).read_to_end(&mut bytes).with_context(|| format!("cannot read {what}"))?;
    if bytes.len() as u64 > MAX_SPEC_BYTES {
        bail!("{what} is larger than {} MiB, the most a spec may be", MAX_SPEC_BYTES >> 20);
    }
    String::from_utf8(bytes).map_err(|e| anyhow!("{what} is not UTF-8 text: {}", e.utf8_error()))
}

fn check_files(name: &str, node: &Node) -> Result<()> {
    let files: Vec<(&str, &Path)> = match &node.boot {
        Boot::Kernel { kernel, initrd, .. } => {
            std::iter::once(("kernel", kernel.as_path())).chain(initrd.as_deref().map(|i| ("initrd", i))).collect()
        }
        Boot::StartScript(script) => vec![("startScript", script.as_path())],
    };
    for (field, path) in files {
        if !path.is_file() {
            bail!("node {name:?}: {field}: {path:?} is not a file");
        }
    }
    Ok(())
}

fn resolve_tool(given: Option<&Path>, field: &str, program: &str, package: &str) -> Result<PathBuf> {
    match given {
        Some(path) if path.is_file() => Ok(path.to_path_buf()),
        Some(path) => bail!("{field}: {path:?} is not a file"),
        None => which::which(program).map_err(|_| {
            anyhow!("{program} not found on PATH: install the Debian package {package}, or set \"{field}\" in the spec")
        }),
    }
}

pub fn plan_json(plan: &Plan) -> String {
    serde_json::to_string_pretty(plan).expect("a plan always serialises") + "\n"
}

/// Writes the output directory of a loaded spec (`vmlab build`; `vmlab test`
/// on a spec, into its session directory).
pub fn write_build(loaded: &Loaded, out: &Path) -> Result<()> {
    let vmlab = std::env::current_exe().context("cannot find the vmlab executable")?;
    // Absolute: the driver configuration names the run scripts by path.
    let absolute = std::env::current_dir().context("cannot find the current directory")?.join(out);
    write_tree(out, &files(loaded, &vmlab, &absolute))
}

/// One file of the output directory.
pub struct File {
    pub path: String,
    pub contents: String,
    pub executable: bool,
}

/// Everything `vmlab build` writes into `out`, in a fixed order.
pub fn files(loaded: &Loaded, vmlab: &Path, out_dir: &Path) -> Vec<File> {
    let Loaded { spec, plan } = loaded;
    let data = |path: String, contents: String| File { path, contents, executable: false };
    let script = |path: String, contents: String| File { path, contents, executable: true };
    let mut out =
        vec![data(layout::PLAN_FILE.into(), plan_json(plan)), data(layout::HOSTS_FILE.into(), plan.hosts.clone())];
    for m in &plan.machines {
        out.push(data(layout::config_file(&m.name), guest_config(plan, m)));
        out.push(script(layout::run_script(&m.name), run_script(plan, m, &spec.nodes[&m.name])));
    }
    out.push(script(layout::RUN_VMS.into(), run_vms_script(plan, vmlab)));
    out.push(data(layout::DRIVER_CONFIG.into(), driver_config(plan, out_dir)));
    out
}

/// Pure: [`layout::DRIVER_CONFIG`]'s contents: the run scripts as its start scripts. Its test script is a placeholder,
/// `test-script.py` next to where the driver runs, for the user to write or
/// to point elsewhere; the timeout is the driver's own default.
fn driver_config(plan: &Plan, out_dir: &Path) -> String {
    let vms: serde_json::Map<String, serde_json::Value> = plan
        .machines
        .iter()
        .map(|m| {
            let script = out_dir.join(layout::run_script(&m.name));
            (m.name.clone(), serde_json::json!({ "name": m.name, "start_script": script }))
        })
        .collect();
    let config = serde_json::json!({
        "vms": vms,
        "containers": {},
        "vlans": plan.vlans,
        "global_timeout": 3600,
        "enable_ssh_backdoor": false,
        "test_script": "test-script.py",
    });
    serde_json::to_string_pretty(&config).expect("JSON values serialise") + "\n"
}

/// Writes `files` into `out` all at once: they go into a fresh sibling
/// directory first, renamed into place at the end, so a failure leaves nothing half-written.
fn write_tree(out: &Path, files: &[File]) -> Result<()> {
    if out.exists() {
        let empty = fs::read_dir(out).with_context(|| format!("cannot read {out:?}"))?.next().is_none();
        if !empty {
            bail!("output directory {out:?} is not empty");
        }
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).with_context(|| format!("cannot create {parent:?}"))?;
    let staging = tempfile::Builder::new()
        .prefix(".vmlab-build-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a directory in {parent:?}"))?;
    for file in files {
        let path = staging.path().join(&file.path);
        fs::create_dir_all(path.parent().expect("files are inside the tree"))
            .with_context(|| format!("cannot create {path:?}"))?;
        fs::write(&path, &file.contents).with_context(|| format!("cannot write {path:?}"))?;
        let mode = if file.executable { 0o755 } else { 0o644 };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {path:?}"))?;
    }
    fs::set_permissions(staging.path(), fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot set the mode of {:?}", staging.path()))?;
    if out.exists() {
        fs::remove_dir(out).with_context(|| format!("cannot replace {out:?}"))?;
    }
    let staged = staging.keep();
    fs::rename(&staged, out).or_else(|err| {
        let _ = fs::remove_dir_all(&staged);
        Err(err).with_context(|| format!("cannot move {staged:?} to {out:?}"))
    })
}

/// The fw_cfg guest configuration (format: docs/design.md).
pub fn guest_config(plan: &Plan, m: &MachinePlan) -> String {
    let mut s = String::from("# vmlab guest configuration\n");
    s += &format!("hostname {}\n", m.name);
    s += &format!("interface eth0 {} {}/24\n", crate::plan::addr::USER_NIC_MAC, crate::plan::addr::USER_NET_GUEST_IPV4);
    for i in &m.interfaces {
        s += &format!(
            "interface {} {} {}/{} {}/{}\n",
            i.name, i.mac, i.ipv4, i.ipv4_prefix_length, i.ipv6, i.ipv6_prefix_length
        );
    }
    for line in plan.hosts.lines() {
        s += &format!("host {line}\n");
    }
    s
}

fn render_opts(opts: &[Opt]) -> String {
    opts.iter()
        .map(|o| format!("  {}", o.iter().map(Word::to_string).collect::<Vec<_>>().join(" ")))
        .collect::<Vec<_>>()
        .join(" \\\n")
}

/// `bin/run-<name>-vm`: a readable POSIX sh script that starts one machine.
pub fn run_script(plan: &Plan, m: &MachinePlan, node: &Node) -> String {
    let script_name = layout::run_script_name(&m.name);
    let mut s = format!(
        "#!/bin/sh\n\
         # Generated by vmlab: starts machine {name:?} (number {number}) of network {network:?}.\n\
         # Environment (docs/design.md): VMLAB_STATE_DIR, QEMU_VDE_SOCKET_<vlan>,\n\
         # VMLAB_ACCEL (kvm, tcg, auto), QEMU_OPTS, QEMU_KERNEL_PARAMS (direct boot), QEMU_NET_OPTS (start script),\n\
         # SHARED_DIR (direct boot: a 9p share tagged \"shared\"; a start script shares it itself).\n\
         # With arguments it is a nixpkgs start script (nixos/lib/test-driver; docs/nix.md):\n\
         # they go to QEMU and bring the serial console, virtio-serial bus, backdoor\n\
         # console, QMP and monitor (the driver's -qmp, -monitor, -chardev id=shell,\n\
         # -device virtio-serial, -device virtconsole, -serial, -no-reboot); the data\n\
         # port joins their virtio-serial bus; with USE_TMPDIR the state directory is TMPDIR.\n\
         set -eu\n\
         {out}=$(cd \"$(dirname \"$0\")/..\" && pwd)\n",
        name = m.name,
        number = m.number,
        network = plan.name,
        out = qemu::OUT_VAR,
    );
    s += &state_dir_preamble(plan, m, &script_name);
    let mut comma_checked = format!("${}${}", qemu::OUT_VAR, qemu::STATE_VAR);
    for i in &m.interfaces {
        let env = format!("QEMU_VDE_SOCKET_{}", i.vlan);
        s += &format!(
            "if [ -n \"${{{env}-}}\" ]; then\n  \
               {var}={vde}${env}\n\
             else\n  \
               echo \"{script_name}: {env} is unset: {iface} (vlan {vlan}) is on a private hub\" >&2\n  \
               {var}={hub}\n\
             fi\n",
            var = qemu::netdev_var(i.vlan),
            vde = qemu::vde_netdev(i.vlan),
            hub = qemu::hub_netdev(i.vlan),
            iface = i.name,
            vlan = i.vlan,
        );
        comma_checked += &format!("${{{env}-}}");
    }
    s += &format!(
        "case \"{comma_checked}\" in\n  \
           *,*) echo \"{script_name}: QEMU cannot take paths with ',': $out, $state\" >&2; exit 2 ;;\n\
         esac\n",
    );
    s += &format!(
        "{accel}=${{VMLAB_ACCEL:-auto}}\n\
         if [ \"${accel}\" = auto ]; then\n  \
           if {kvm_usable}; then {accel}=kvm; else {accel}=tcg; fi\n\
         fi\n",
        accel = qemu::ACCEL_VAR,
        kvm_usable = crate::accel::kvm_usable_sh(),
    );
    match &node.boot {
        Boot::Kernel { kernel, initrd, cmdline } => {
            s += &format!(
                "{params}=${{{params}-}}\n\
                 {own}\
                 {shared}\
                 # QEMU_OPTS is split into words (as nixpkgs does), not globbed.\n\
                 set -f\n\
                 exec {qemu} \\\n{opts} \\\n  \"$@\" \\\n  ${{QEMU_OPTS-}}\n",
                params = qemu::KERNEL_PARAMS_VAR,
                qemu = quote(&plan.qemu.to_string_lossy()),
                own = own_channels(true),
                shared = shared_dir(&script_name),
                opts = render_opts(&qemu::direct_boot_opts(m, kernel, initrd.as_deref(), cmdline, &node.qemu_options)),
            );
        }
        Boot::StartScript(script) => {
            s += &format!(
                "# The start script keeps its disk image in the current directory.\n\
                 cd \"${state}\"\n\
                 QEMU_NET_OPTS={net}${{QEMU_NET_OPTS:+,$QEMU_NET_OPTS}}\n\
                 # Its own temporary directory is the state directory, as nixpkgs' driver\n\
                 # has it: without USE_TMPDIR it makes a new nix-vm.* there on every start.\n\
                 TMPDIR=${state}\n\
                 USE_TMPDIR=1\n\
                 export QEMU_NET_OPTS TMPDIR USE_TMPDIR\n\
                 # vmlab's options are its arguments, which it passes on to QEMU as they\n\
                 # are (\"$@\"). Not QEMU_OPTS (the caller's, passed on): qemu-vm.nix expands\n\
                 # it unquoted without set -f, splitting and globbing a path with a space or *?[.\n\
                 {own}\
                 exec {script} \\\n{opts} \\\n  \"$@\"\n",
                state = qemu::STATE_VAR,
                own = own_channels(false),
                opts = render_opts(&qemu::start_script_opts(m, &node.qemu_options)),
                net = quote(&qemu::user_net_options(&m.forward_ports)),
                script = quote(&script.to_string_lossy()),
            );
        }
    }
    s
}

/// The run script's lines that give it its own console, backdoor, data
/// channel and QMP unless it has arguments: then it is a nixpkgs start
/// script, and its caller (nixpkgs' test driver) brings those (`"$@"`)
/// but the data channel, whose port joins the caller's virtio-serial bus
/// when there is one. After the caller's arguments: QEMU puts a port on a
/// bus made before it, and refuses one when there is none.
fn own_channels(serial: bool) -> String {
    let indented =
        |opts: &[Opt], by: &str| render_opts(opts).lines().map(|l| format!("{by}{l}")).collect::<Vec<_>>().join("\n");
    format!(
        "if [ $# -eq 0 ]; then\n  \
           set -- \\\n{own}\n\
         else\n  \
           for arg in \"$@\"; do\n    \
             case $arg in\n      \
               virtio-serial | virtio-serial,* | virtio-serial-pci | virtio-serial-pci,*)\n        \
                 set -- \"$@\" \\\n{data}\n        \
                 break ;;\n    \
             esac\n  \
           done\n\
         fi\n",
        own = indented(&qemu::own_channels(serial), "  "),
        data = indented(&qemu::data_port(), "        "),
    )
}

/// The run script's lines that offer `SHARED_DIR` (nixpkgs' driver's
/// exchange directory) to the guest as a 9p share, which a guest whose
/// kernel has 9p mounts at /tmp/shared (the default guest says it cannot).
fn shared_dir(script_name: &str) -> String {
    format!(
        "if [ -n \"${{SHARED_DIR-}}\" ]; then\n  \
           case $SHARED_DIR in *,*) echo \"{script_name}: QEMU cannot take paths with ',': $SHARED_DIR\" >&2; exit 2 ;; esac\n  \
           set -- \"$@\" -virtfs local,path=\"$SHARED_DIR\",security_model=none,mount_tag=shared\n\
         fi\n"
    )
}

/// The run script's lines that set the state directory (docs/design.md,
/// security notes). It holds the backdoor socket, a root shell in the guest,
/// so whoever can write to it can take that socket's place: a given
/// `VMLAB_STATE_DIR` must be ours and writable by no one else, and without
/// one the script makes a fresh private directory rather than trusting a
/// predictable name that another user may have made first.
fn state_dir_preamble(plan: &Plan, m: &MachinePlan, script_name: &str) -> String {
    let template = format!("vmlab-{}-{}-XXXXXX", plan.name, m.name);
    format!(
        "# Called as a nixpkgs start script, its state directory is the caller's TMPDIR.\n\
         if [ $# -gt 0 ] && [ -n \"${{USE_TMPDIR-}}\" ] && [ -z \"${{VMLAB_STATE_DIR-}}\" ]; then\n  \
           VMLAB_STATE_DIR=${{TMPDIR:-/tmp}}\n\
         fi\n\
         if [ -n \"${{VMLAB_STATE_DIR-}}\" ]; then\n  \
           # Absolute: a start script runs in it (cd) and QEMU gets paths inside it.\n  \
           case $VMLAB_STATE_DIR in /*) {state}=$VMLAB_STATE_DIR ;; *) {state}=$PWD/$VMLAB_STATE_DIR ;; esac\n  \
           mkdir -p -m 0700 \"${state}\"\n  \
           if [ -z \"$(find \"${state}\" -prune -type d -user \"$(id -u)\" ! -perm -g+w ! -perm -o+w)\" ]; then\n    \
             echo \"{script_name}: refusing VMLAB_STATE_DIR ${state}: it must be a directory of ours that no one else can write to\" >&2\n    \
             exit 2\n  \
           fi\n\
         else\n  \
           {state}=$(mktemp -d \"${{XDG_RUNTIME_DIR:-${{TMPDIR:-/tmp}}}}\"/{template})\n  \
           echo \"{script_name}: state directory: ${state} (removed when QEMU exits)\" >&2\n  \
           # QEMU takes this shell's place (exec), so a helper removes the directory once\n  \
           # QEMU has exited: it reads a FIFO whose writing end only QEMU holds (fd 9).\n  \
           mkfifo \"${state}\"/qemu-alive\n  \
           (trap '' HUP INT TERM; cat \"${state}\"/qemu-alive; rm -rf \"${state}\") >/dev/null 2>&1 &\n  \
           exec 9>\"${state}\"/qemu-alive\n  \
           rm \"${state}\"/qemu-alive\n\
         fi\n",
        state = qemu::STATE_VAR,
        template = quote(&template),
    )
}

/// `bin/run-vms`: the whole network, by `vmlab up` on this directory.
pub fn run_vms_script(plan: &Plan, vmlab: &Path) -> String {
    format!(
        "#!/bin/sh\n\
         # Generated by vmlab: starts every machine of network {name:?}; Ctrl-C stops them all.\n\
         # Options are `vmlab up`'s (--accel, --keep-state); VMLAB overrides the vmlab executable.\n\
         out=$(cd \"$(dirname \"$0\")/..\" && pwd)\n\
         vmlab=${{VMLAB:-{vmlab}}}\n\
         exec \"$vmlab\" up \"$out\" \"$@\"\n",
        name = plan.name,
        vmlab = quote(&vmlab.to_string_lossy()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_spec_limits() {
        let spaces = |n: u64| Box::new(std::io::repeat(b' ').take(n)) as Box<dyn Read>;
        let bytes = |b: &'static [u8]| Box::new(b) as Box<dyn Read>;
        for (source, want) in [
            (bytes(b"{}"), Ok(2)),
            (spaces(MAX_SPEC_BYTES), Ok(MAX_SPEC_BYTES as usize)),
            (spaces(MAX_SPEC_BYTES + 1), Err("spec x is larger than 16 MiB, the most a spec may be")),
            (Box::new(std::io::repeat(0)), Err("spec x is larger than 16 MiB")),
            (
                bytes(b"{\"a\": \"\xe9\"}"),
                Err("spec x is not UTF-8 text: invalid utf-8 sequence of 1 bytes from index 7"),
            ),
        ] {
            match (read_spec(source, "spec x"), want) {
                (Ok(text), Ok(len)) => assert_eq!(text.len(), len),
                (Err(e), Err(want)) => assert!(e.to_string().starts_with(want), "got: {e}\nwant: {want}"),
                (got, want) => panic!("got {:?}, want {want:?}", got.map(|t| t.len())),
            }
        }
    }
}
