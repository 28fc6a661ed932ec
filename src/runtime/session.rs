//! The session directory: private, unique per run, holding every socket and
//! log of one running network (layout in docs/design.md).

use std::ffi::OsString;
use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::layout::SessionDir;
use crate::plan::Plan;

/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// The longest name vde_switch gives a port's data socket in its directory:
/// `<port>.<n>` (seen as `001.5`), with room for three-digit ports and a
/// five-digit `n`.
const VDE_PORT_SOCKET: &str = "000.00000";

/// Random characters in the directory name (`XXXXXX` in docs/design.md).
const RANDOM_CHARS: usize = 6;

/// A session directory, removed on drop unless kept.
pub struct Session {
    dir: TempDir,
    keep: bool,
}

impl Session {
    /// Creates `vmlab-<network>-XXXXXX` (mode 0700) under [`base_dir`], after
    /// checking that every socket the network will create fits in `sun_path`.
    pub fn create(plan: &Plan, keep: bool) -> Result<Session> {
        let base = base_dir(std::env::var_os("XDG_RUNTIME_DIR"), std::env::var_os("TMPDIR"));
        // Absolute, because run scripts and QEMU get paths inside it.
        let base = std::env::current_dir().context("cannot find the current directory")?.join(base);
        let prefix = format!("vmlab-{}-", plan.name);
        // The real name has the same length, so a check on a placeholder holds for it.
        let placeholder = SessionDir { root: base.join(format!("{prefix}{}", "X".repeat(RANDOM_CHARS))) };
        check_socket_paths(&placeholder, plan)?;
        let mut dir = tempfile::Builder::new()
            .prefix(&prefix)
            .rand_bytes(RANDOM_CHARS)
            .permissions(Permissions::from_mode(0o700))
            .tempdir_in(&base)
            .with_context(|| format!("cannot create a session directory in {}", base.display()))?;
        dir.disable_cleanup(keep);
        Ok(Session { dir, keep })
    }

    pub fn layout(&self) -> SessionDir {
        SessionDir::new(self.dir.path())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the directory stays after drop (`--keep-state`).
    pub fn kept(&self) -> bool {
        self.keep
    }
}

/// Pure: where session directories go: `$XDG_RUNTIME_DIR`, else `$TMPDIR`,
/// else /tmp (empty values count as unset).
pub fn base_dir(xdg_runtime_dir: Option<OsString>, tmpdir: Option<OsString>) -> PathBuf {
    [xdg_runtime_dir, tmpdir].into_iter().flatten().find(|v| !v.is_empty()).map_or_else(|| "/tmp".into(), PathBuf::from)
}

/// Pure: fails, naming the longest offending path, when a socket of the
/// network would not fit in `sun_path`.
pub fn check_socket_paths(layout: &SessionDir, plan: &Plan) -> Result<()> {
    let vlan_sockets = plan.vlans.iter().map(|&v| layout.vlan_dir(v).join(VDE_PORT_SOCKET));
    let machine_sockets = plan.machines.iter().flat_map(|m| [layout.shell_socket(&m.name), layout.qmp_socket(&m.name)]);
    let all = std::iter::once(layout.control_socket()).chain(vlan_sockets).chain(machine_sockets);
    if let Some(longest) = all.max_by_key(|p| p.as_os_str().len()) {
        let len = longest.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            bail!(
                "socket path {} would be {len} bytes, over the {MAX_SOCKET_PATH}-byte limit of unix sockets; \
                 use shorter machine or network names, or point XDG_RUNTIME_DIR or TMPDIR to a shorter directory",
                longest.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::tests::plan_with;

    #[test]
    fn base_dir_preference() {
        let s = |v: &str| Some(OsString::from(v));
        let cases = [
            (s("/run/user/1000"), s("/var/tmp"), "/run/user/1000"),
            (None, s("/var/tmp"), "/var/tmp"),
            (s(""), s("/var/tmp"), "/var/tmp"),
            (s(""), s(""), "/tmp"),
            (None, None, "/tmp"),
        ];
        for (xdg, tmp, expected) in cases {
            assert_eq!(base_dir(xdg.clone(), tmp.clone()), PathBuf::from(expected), "{xdg:?} {tmp:?}");
        }
    }

    #[test]
    fn socket_path_limit() {
        let name63 = "m".repeat(63);
        let plan = plan_with(&[(&name63, &[1])]);
        // "/rrr…" + "/" + 63 + "/shell.sock": a 32-byte root fills the 107 bytes exactly.
        let fits = SessionDir { root: format!("/{}", "r".repeat(31)).into() };
        assert_eq!(fits.shell_socket(&name63).as_os_str().len(), MAX_SOCKET_PATH);
        check_socket_paths(&fits, &plan).unwrap();
        let over = SessionDir { root: format!("/{}", "r".repeat(32)).into() };
        let err = check_socket_paths(&over, &plan).unwrap_err().to_string();
        let expected_path = format!("/{}/{name63}/shell.sock", "r".repeat(32));
        assert!(
            err.starts_with(&format!("socket path {expected_path} would be 108 bytes, over the 107-byte limit")),
            "{err}"
        );
        // Switch directories count too, with room for QEMU's own socket in them.
        let switch_only = plan_with(&[("a", &[255])]);
        let deep = SessionDir { root: format!("/{}", "r".repeat(89)).into() };
        let err = check_socket_paths(&deep, &switch_only).unwrap_err().to_string();
        assert!(err.contains("/vlan255/000.00000 would be 108 bytes"), "{err}");
    }

    #[test]
    fn session_dir_is_private_unique_and_removed_unless_kept() {
        let plan = plan_with(&[("a", &[1])]);
        let (a, b) = (Session::create(&plan, false).unwrap(), Session::create(&plan, false).unwrap());
        assert_ne!(a.path(), b.path());
        let name = a.path().file_name().unwrap().to_str().unwrap().to_owned();
        assert!(
            name.starts_with(&format!("vmlab-{}-", plan.name)) && name.len() == "vmlab-".len() + plan.name.len() + 7,
            "{name}"
        );
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let (gone, kept) = (a.path().to_owned(), Session::create(&plan, true).unwrap());
        let kept_path = kept.path().to_owned();
        drop((a, b, kept));
        assert!(!gone.exists());
        assert!(kept_path.exists());
        std::fs::remove_dir(kept_path).unwrap();
    }
}
