//! Serving the control socket: a thread listens, and a thread serves each
//! connection, a request and its response at a time.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use super::Driver;
use crate::runtime::spawn_thread;

/// Serves the control socket until the process ends; the listener thread is detached.
pub fn serve(driver: Arc<Driver>, path: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    spawn_thread("control".into(), move || {
        for (n, stream) in listener.incoming().flatten().enumerate() {
            let driver = driver.clone();
            // A connection whose thread cannot start is dropped: its client sees it closed.
            let _ = spawn_thread(format!("control-{n}"), move || serve_connection(&driver, stream));
        }
    })
}

fn serve_connection(driver: &Driver, stream: UnixStream) {
    let Ok(mut writer) = stream.try_clone() else { return };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let mut response = driver.handle_line(&line);
        response.push('\n');
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}
