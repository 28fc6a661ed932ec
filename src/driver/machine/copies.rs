//! Copies between host and guest, through the data port or the backdoor.

use super::*;

/// Copies go through the backdoor in pieces this big, so neither side holds
/// a whole large file in one command or one reply.
const COPY_IN_CHUNK: usize = 1024 * 1024;
const COPY_IN_RAW_CHUNK: usize = 4 * 1024 * 1024;
/// Out of the guest, smaller: QEMU drops console output while the host
/// reads too slowly (a loaded host), and a piece that lost bytes is fetched
/// again whole, so a small piece is likelier to come through on a retry.
const COPY_OUT_CHUNK: u64 = 1024 * 1024;
/// The most a copy out reserves on the guest's word of its size.
const RESERVE_AT_MOST: u64 = 1 << 30;

impl DrivenMachine {
    /// Copies a host file or directory into the guest so that it is `dest`
    /// there (replacing what was at `dest`). Binary-safe: a tar stream,
    /// base64 in pieces through the backdoor.
    pub fn copy_to_vm(&mut self, source: &Path, dest: &str) -> Result<(), DriverError> {
        let started = Instant::now();
        let name =
            source.file_name().ok_or_else(|| self.err(Kind::Request, format!("cannot copy {}", source.display())))?;
        self.wait_for_boot()?;
        if self.data.is_some() {
            return self.stream_to_vm(source, dest, started);
        }
        let mut archive = Vec::new();
        let packed =
            crate::driver::copy::pack(source, &mut archive).map_err(|e| self.err(Kind::Request, format!("{e:#}")))?;
        self.warn_skipped(&source.display().to_string(), &packed.skipped);
        let tmp = format!("/tmp/vmlab-copy-in.{}", std::process::id());
        let staged = format!("{tmp}.tar");
        self.copy_step(&format!("rm -rf {t} {a}; mkdir -p {t}", t = quote(&tmp), a = quote(&staged)))?;
        if self.shell_is_bash()? {
            for piece in archive.chunks(COPY_IN_RAW_CHUNK) {
                self.append_raw(&staged, piece)?;
            }
        } else {
            for piece in archive.chunks(COPY_IN_CHUNK) {
                let data = crate::driver::base64::encode_lines(piece, 76);
                self.copy_step(&format!("base64 -d >> {} <<'VMLAB_DATA'\n{data}VMLAB_DATA", quote(&staged)))?;
            }
        }
        let name = name.to_string_lossy();
        let dest_q = quote(dest);
        self.copy_step(&format!(
            "tar -x -C {t} -f {a} && rm -rf {dest_q} && mkdir -p \"$(dirname {dest_q})\" && mv {item} {dest_q}; s=$?; rm -rf {t} {a}; exit $s",
            t = quote(&tmp),
            a = quote(&staged),
            item = quote(&format!("{tmp}/{name}")),
        ))?;
        self.say(&format!(
            "copied {} to {dest} ({} bytes, {})",
            source.display(),
            packed.bytes,
            secs(started.elapsed())
        ));
        Ok(())
    }

    /// Copies a guest file or directory to `<out>/<target_dir>/<its name>` on
    /// the host (NixOS's `copy_from_vm`); the host path.
    pub fn copy_from_vm(&mut self, source: &str, target_dir: &str) -> Result<PathBuf, DriverError> {
        let started = Instant::now();
        let src = Path::new(source);
        let name = src.file_name().ok_or_else(|| self.err(Kind::Request, format!("cannot copy {source}")))?.to_owned();
        let parent = src.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        self.wait_for_boot()?;
        if self.data.is_some() {
            return self.stream_from_vm(source, parent, &name, target_dir, started);
        }
        let archive = format!("/tmp/vmlab-copy-out.{}.tar", std::process::id());
        let a = quote(&archive);
        let size = self.copy_step(&format!(
            "tar -C {} -cf {a} {} && wc -c < {a}",
            quote(&parent.to_string_lossy()),
            quote(&name.to_string_lossy())
        ));
        let size: u64 = match size {
            Ok(out) => {
                String::from_utf8_lossy(&out).trim().parse().map_err(|_| self.err(Kind::Harness, "bad archive size"))?
            }
            Err(e) => {
                let _ = self.execute(&format!("rm -f {a}"), None);
                return Err(e);
            }
        };
        // The size is the guest's word: reserved up to a bound (untouched
        // pages cost nothing; growing by doubling would copy, and hold twice
        // the archive at its peak), and a piece that comes back empty ends
        // the copy (checked below).
        let mut data = Vec::with_capacity(size.min(RESERVE_AT_MOST) as usize);
        for i in 0.. {
            if data.len() as u64 >= size {
                break;
            }
            let piece = self.copy_step(&format!("dd if={a} bs={COPY_OUT_CHUNK} skip={i} count=1 2>/dev/null"))?;
            if piece.is_empty() {
                break;
            }
            data.extend(piece);
        }
        self.copy_step(&format!("rm -f {a}"))?;
        if data.len() as u64 != size {
            return Err(
                self.err(Kind::Harness, format!("copy of {source} came back with {} of {size} bytes", data.len()))
            );
        }
        self.unpack_copy(&data[..], size, source, target_dir, &name, started)
    }

    /// Unpacks the archive of `size` bytes a copy of `source` brought out
    /// as `<out>/<target_dir>/<name>`, under the copy policy.
    fn unpack_copy(
        &self,
        archive: impl std::io::Read,
        size: u64,
        source: &str,
        target_dir: &str,
        name: &std::ffi::OsStr,
        started: Instant,
    ) -> Result<PathBuf, DriverError> {
        let dir = self.out_dir.join(target_dir);
        let target = dir.join(name);
        let copied = crate::driver::copy::unpack(archive, &dir, name).map_err(|e| {
            // A guest sending what may not be unpacked fails the test; the host failing to write is vmlab's.
            let kind = if e.is::<crate::driver::copy::Refused>() { Kind::Failed } else { Kind::Harness };
            self.err(kind, format!("copying {source} to {}: {e:#}", target.display()))
        })?;
        self.warn_skipped(source, &copied.skipped);
        self.say(&format!(
            "copied {source} to {} ({size} bytes of tar, {})",
            target.display(),
            secs(started.elapsed())
        ));
        Ok(target)
    }

    /// [`DrivenMachine::copy_to_vm`] over the data port: the archive is made in an
    /// unnamed host file (memory stays flat) and streamed into `tar -x` in
    /// the guest.
    fn stream_to_vm(&mut self, source: &Path, dest: &str, started: Instant) -> Result<(), DriverError> {
        let name = source.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let mut archive = self.host_file()?;
        let packed =
            crate::driver::copy::pack(source, &mut archive).map_err(|e| self.err(Kind::Request, format!("{e:#}")))?;
        self.warn_skipped(&source.display().to_string(), &packed.skipped);
        let size = archive.seek(SeekFrom::End(0)).and_then(|size| archive.rewind().map(|()| size));
        let size =
            size.map_err(|e| self.err(Kind::Harness, format!("reading the archive of {}: {e}", source.display())))?;
        let out =
            self.with_shell(|shell, alive| shell.copy_in(&mut archive, size, &name, dest, DEFAULT_TIMEOUT, alive))?;
        if out.status != 0 {
            let why = guest_says(&out);
            return Err(self.err(Kind::Failed, format!("cannot copy {} to {dest}: {why}", source.display())));
        }
        self.say(&format!("copied {} to {dest} ({size} bytes of tar, {})", source.display(), secs(started.elapsed())));
        Ok(())
    }

    /// [`DrivenMachine::copy_from_vm`] over the data port: the guest's `tar`
    /// streams into an unnamed host file (memory stays flat), unpacked from
    /// there under the copy policy.
    fn stream_from_vm(
        &mut self,
        source: &str,
        parent: &Path,
        name: &std::ffi::OsStr,
        target_dir: &str,
        started: Instant,
    ) -> Result<PathBuf, DriverError> {
        let mut archive = self.host_file()?;
        let (parent, item) = (parent.to_string_lossy().into_owned(), name.to_string_lossy().into_owned());
        let out =
            self.with_shell(|shell, alive| shell.copy_out(&parent, &item, &mut archive, DEFAULT_TIMEOUT, alive))?;
        if out.status != 0 {
            return Err(self.err(Kind::Failed, format!("cannot copy {source} out of the guest: {}", guest_says(&out))));
        }
        let size = archive.stream_position().unwrap_or_default();
        archive.rewind().map_err(|e| self.err(Kind::Harness, format!("reading the copy of {source}: {e}")))?;
        self.unpack_copy(std::io::BufReader::new(archive), size, source, target_dir, name, started)
    }

    /// An unnamed file in the output directory, for an archive on its way:
    /// on disk, not in memory (a tmpfs /tmp would be memory).
    fn host_file(&self) -> Result<std::fs::File, DriverError> {
        std::fs::create_dir_all(&self.out_dir)
            .and_then(|()| tempfile::tempfile_in(&self.out_dir))
            .map_err(|e| self.err(Kind::Harness, format!("cannot make a file in {}: {e}", self.out_dir.display())))
    }

    /// Says which entries a copy left out (device nodes, FIFOs, sockets).
    fn warn_skipped(&self, source: &str, skipped: &[String]) {
        for entry in skipped {
            self.log.write(Some(&self.name), &format!("warning: copy of {source}: left out {entry}"), Style::Bad);
        }
    }

    /// Whether the backdoor shell is bash, which reads its input no further
    /// than the end of a command line (asked once per boot).
    fn shell_is_bash(&mut self) -> Result<bool, DriverError> {
        if let Some(known) = self.shell_is_bash {
            return Ok(known);
        }
        // Without a timeout, the command runs in a subshell of the backdoor
        // shell, where `$$` is the backdoor shell itself.
        let out = self.execute("readlink /proc/$$/exe", None)?;
        let known = out.status == 0 && String::from_utf8_lossy(&out.stdout).trim_end().ends_with("/bash");
        self.shell_is_bash = Some(known);
        Ok(known)
    }

    /// Appends `data` to a guest file through [`Shell::append_raw`].
    fn append_raw(&mut self, path: &str, data: &[u8]) -> Result<(), DriverError> {
        match self.with_shell(|shell, alive| shell.append_raw(path, data, DEFAULT_TIMEOUT, alive))? {
            0 => Ok(()),
            status => Err(self.err(Kind::Failed, format!("copy failed: writing {path} ended with status {status}"))),
        }
    }

    /// One step of a copy: must succeed; its standard output.
    fn copy_step(&mut self, command: &str) -> Result<Vec<u8>, DriverError> {
        let out = self.execute(command, Some(DEFAULT_TIMEOUT))?;
        if out.status != 0 {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(self.err(Kind::Failed, format!("copy failed (exit code {}){}", out.status, stderr_note(&err))));
        }
        Ok(out.stdout)
    }
}

/// Pure: why a guest-side step failed, in the guest's words.
pub(super) fn guest_says(out: &Output) -> String {
    match stderr_ending(&String::from_utf8_lossy(&out.stderr), NOTE_LINES) {
        None => format!("exit code {}, and the guest said nothing", out.status),
        Some(said) => format!("exit code {}{said}", out.status),
    }
}
