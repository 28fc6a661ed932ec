//! The framing's tests: scripts, replies in pieces of any size, the banner.

use super::*;

pub(crate) fn reply(token: &str, out: &[u8], err: &[u8], status: i32) -> Vec<u8> {
    format!(
        "{token} out\n{}{token} err\n{}{token} end {status} {} {}\n",
        base64::encode_lines(out, 76),
        base64::encode_lines(err, 76),
        out.len(),
        err.len(),
    )
    .into_bytes()
}

#[test]
fn a_reply_that_lost_lines_is_an_error_and_can_be_asked_for_again() {
    let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    let whole = String::from_utf8(reply("T1", &data, b"", 0)).unwrap();
    let lost: String =
        whole.lines().filter(|l| *l != whole.lines().nth(2).unwrap()).map(|l| format!("{l}\n")).collect();
    let mut p = ReplyParser::new("T1", false);
    let e = p.feed(lost.as_bytes()).unwrap_err();
    assert_eq!(e, "243 of 300 bytes of output and 0 of 0 of standard error came back");
    // Without sizes (a guest-side line of vmlab's own), nothing is checked.
    assert_eq!(parse_in_pieces(b"T1 out\nT1 err\nT1 end 3\n", 4).0.status, 3);
    // Asked for again, the reply is sent from the files the command left.
    assert_eq!(resend_script("T2"), "__vmlab_reply T2\n");
    assert!(
        functions(false).contains("printf '%s end %s %s %s\\n' \"$1\" \"$__vmlab_s\" \"$__vmlab_so\" \"$__vmlab_se\"")
    );
}

pub(crate) fn parse_in_pieces(data: &[u8], piece: usize) -> (Output, usize) {
    let mut p = ReplyParser::new("T1", false);
    let mut offset = 0;
    for chunk in data.chunks(piece) {
        if let Some((out, used)) = p.feed(chunk).unwrap() {
            return (out, offset + used);
        }
        offset += chunk.len();
    }
    panic!("no reply in {:?}", String::from_utf8_lossy(data));
}

#[test]
fn script_carries_the_command_quoted_in_one_short_line() {
    let cases = [
        ("true", None, "__vmlab_r T1 - true\n"),
        ("echo '$HOME' \"`x`\"\nfalse", Some(5), "__vmlab_r T1 5 'echo '\\''$HOME'\\'' \"`x`\"\nfalse'\n"),
        // What once ended a heredoc is just text.
        ("cat <<x\nT1_EOF\nx", None, "__vmlab_r T1 - 'cat <<x\nT1_EOF\nx'\n"),
    ];
    for (command, timeout, line) in cases {
        let s = script("T1", command, timeout).unwrap();
        assert_eq!(s, line);
        // Markers are only ever printed, never sent, so an echoing console cannot fake one.
        assert!(!s.contains("T1 out") && !s.contains("T1 end"), "{s}");
    }
    // A command without a timeout is a fork of the shell, no program and
    // no file; rm runs on every hundredth command.
    let f = functions(false);
    assert!(f.contains("(set -eu $__vmlab_pf --; eval \"$__vmlab_c\") </dev/null"), "{f}");
    assert!(f.contains("case $__vmlab_n in *00) rm -f"), "{f}");
}

#[test]
fn raw_appends_read_exactly_the_data_and_reply_like_a_command() {
    let line = raw_append_line("T1", "/tmp/a b", 1000);
    assert_eq!(
        line,
        "head -c 1000 | base64 -d >> '/tmp/a b'; printf '%s out\\n%s err\\n%s end %s\\n' T1 T1 T1 \"$?\"\n"
    );
    assert!(!line.contains("T1 out"), "the marker is printed, never sent");
    let (out, _) = parse_in_pieces(b"T1 out\nT1 err\nT1 end 0\n", 5);
    assert_eq!((out.status, out.stdout.len()), (0, 0));
}

/// The port is found by its name; a port named `null` stands for a
/// real one, its device being /dev/null (the shell started on it reads
/// end of file and exits).
#[test]
fn the_data_shell_is_started_on_the_port_found_by_name() {
    /// (ports and their names, status, standard output, standard error)
    type Case = (&'static [(&'static str, &'static str)], i32, &'static str, &'static str);
    let cases: [Case; 4] = [
        (&[("vport0p0", "other"), ("null", "vmlab.data")], 0, "/dev/null ", ""),
        (&[("vport0p0", "other")], 3, "", "no virtio port is named vmlab.data in "),
        (&[], 3, "", "no virtio port is named vmlab.data in "),
        (&[("vport9p9", "vmlab.data")], 3, "", "/dev/vport9p9 is not a character device"),
    ];
    for (ports, status, stdout, stderr) in cases {
        let dir = tempfile::tempdir().unwrap();
        for (port, name) in ports {
            std::fs::create_dir(dir.path().join(port)).unwrap();
            std::fs::write(dir.path().join(port).join("name"), format!("{name}\n")).unwrap();
        }
        let command = data_shell_command(&dir.path().display().to_string(), "vmlab.data");
        let out = std::process::Command::new("busybox").args(["sh", "-euc", &command]).output().unwrap();
        let got = (out.status.code(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // The device, then the PID of the shell started on it.
        let pid = got.1.strip_prefix(stdout).filter(|_| status == 0).map(|rest| rest.trim_end().parse::<u32>());
        assert!(pid.map_or(got.1.is_empty(), |p| p.is_ok()), "{ports:?}: {got:?}");
        assert_eq!(got.0, Some(status), "{ports:?}: {got:?}");
        assert!(got.2.starts_with(stderr), "{ports:?}: {got:?}");
    }
}

#[test]
fn script_refuses_what_it_cannot_carry() {
    assert!(script("T1", "a\0b", None).is_err());
}

#[test]
fn replies_parse_whatever_the_chunking() {
    let binary: Vec<u8> = (0..=255u8).rev().cycle().take(5000).collect();
    let cases: [(&[u8], &[u8], i32); 4] =
        [(b"", b"", 0), (b"hello\n", b"oops\n", 1), (&binary, b"", 255), (b"no newline", &binary, 7)];
    for (out, err, status) in cases {
        let mut data = b"echoed junk\r\nT0 out\nold\n".to_vec();
        let start = data.len();
        data.extend(reply("T1", out, err, status));
        let end = data.len();
        data.extend(b"next");
        for piece in [1, 3, 76, 77, 4096, data.len()] {
            let (o, used) = parse_in_pieces(&data, piece);
            assert_eq!((o.stdout.as_slice(), o.stderr.as_slice(), o.status), (out, err, status), "piece {piece}");
            assert_eq!(used, end, "consumed up to the end marker (reply started at {start})");
        }
    }
}

#[test]
fn unwrapped_and_crlf_base64_is_accepted() {
    let data = b"T1 out\r\naGVsbG8K\r\nT1 err\r\nT1 end 0\r\n";
    assert_eq!(parse_in_pieces(data, 2).0.stdout, b"hello\n");
}

#[test]
fn guest_side_failures_are_errors() {
    let mut p = ReplyParser::new("T1", false);
    assert!(p.feed(b"T1 fail cannot create a temporary directory in /tmp\n").unwrap_err().contains("temporary"));
    let mut p = ReplyParser::new("T1", false);
    assert!(p.feed(b"T1 out\n!!!!\n").is_err());
    let mut p = ReplyParser::new("T1", false);
    assert!(p.feed(b"T1 out\nT1 err\nT1 end x\n").is_err());
}

/// The end line carries both sizes, taken from the offsets of the
/// command's output files; what is written after the command ended is cut,
/// by the guest on the console and by the host on a data port.
#[test]
fn the_end_line_carries_both_sizes_and_late_output_is_cut() {
    for lossless in [false, true] {
        let text = functions(lossless)
            + &script("T1", "printf abc; printf de >&2; exit 4", None).unwrap()
            + "printf late >>\"$__vmlab_o\"; __vmlab_reply T2; echo \"$__vmlab_d\"\n";
        let out = std::process::Command::new("sh").arg("-c").arg(&text).output().unwrap();
        let (reply, used) = parse_in_pieces(&out.stdout, 7);
        assert_eq!((reply.status, reply.stdout, reply.stderr), (4, b"abc".to_vec(), b"de".to_vec()));
        let text = String::from_utf8_lossy(&out.stdout[..used]).into_owned();
        assert!(text.ends_with("T1 end 4 3 2\n"), "{text}");
        let rest = &out.stdout[used..];
        let mut p = ReplyParser::new("T2", lossless);
        let (again, used) = p.feed(rest).unwrap().expect("the reply asked for again");
        assert_eq!((again.status, again.stdout, again.stderr), (4, b"abc".to_vec(), b"de".to_vec()), "{lossless}");
        // Clean up the directory a next command would have emptied.
        let dir = String::from_utf8_lossy(&rest[used..]).trim().to_string();
        assert!(dir.contains("/vmlab."), "{dir}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// Only a data port's reply may be longer than its sizes (written late);
/// a short one is corruption on either channel.
#[test]
fn only_a_data_port_reply_may_run_past_its_sizes() {
    let mut long = reply("T1", b"abcdef", b"", 0);
    let at = long.len() - b"6 0\n".len();
    long.splice(at.., b"3 0\n".iter().copied());
    let mut p = ReplyParser::new("T1", true);
    assert_eq!(p.feed(&long).unwrap().unwrap().0.stdout, b"abc");
    assert!(ReplyParser::new("T1", false).feed(&long).is_err());
    let short = reply("T1", b"ab", b"", 0);
    let short = String::from_utf8(short).unwrap().replace("end 0 2 0", "end 0 3 0");
    assert!(ReplyParser::new("T1", true).feed(short.as_bytes()).is_err());
}

#[test]
fn banner_is_found_across_pieces() {
    let data = format!("boot noise\r\n{BANNER}\r\nrest");
    for piece in [1, 5, data.len()] {
        let mut s = BannerScanner::default();
        let found: Vec<Vec<u8>> = data.as_bytes().chunks(piece).filter_map(|c| s.feed(c)).collect();
        assert!(!found.is_empty(), "piece {piece}");
        assert!(b"\r\nrest".starts_with(&found[0]));
    }
}

#[test]
fn tokens_differ() {
    assert_ne!(new_token(), new_token());
}

/// Runs `functions(lossless)` and then `lines` under each shell a guest's
/// shell may be (dash stands for POSIX sh); what it printed.
fn under_each_shell(lossless: bool, lines: &str) -> Vec<(&'static str, Vec<u8>)> {
    let text = functions(lossless) + lines + "rm -rf \"$__vmlab_d\"\n";
    [["sh", "-c"], ["busybox", "sh"], ["/usr/bin/bash-static", "--norc"]]
        .into_iter()
        .map(|shell| {
            let mut command = std::process::Command::new(shell[0]);
            if shell[0] == "busybox" {
                command.args([shell[1], "-c"]);
            } else {
                command.arg(shell[1]);
                if shell[1] == "--norc" {
                    command.arg("-c");
                }
            }
            let out = command.arg(&text).output().unwrap();
            (shell[0], out.stdout)
        })
        .collect()
}

/// Output written by reopening /dev/stdout or /dev/stderr moves no offset
/// of the shell's descriptors: the files' sizes are then taken with `stat`.
#[test]
fn output_through_dev_stdout_and_dev_stderr_comes_back_whole() {
    let cases: [(&str, &[u8], &[u8]); 3] = [
        ("echo err >/dev/stderr; echo out", b"out\n", b"err\n"),
        ("echo hi | tee /dev/stderr >/dev/null", b"", b"hi\n"),
        ("echo a; echo bbbbbb >/dev/stdout", b"bbbbbb\n", b""),
    ];
    for lossless in [false, true] {
        for (command, stdout, stderr) in cases {
            let lines = script("T1", command, None).unwrap();
            for (shell, printed) in under_each_shell(lossless, &lines) {
                let mut p = ReplyParser::new("T1", lossless);
                let (reply, _) = p.feed(&printed).unwrap().unwrap_or_else(|| panic!("{shell} {command}: no reply"));
                assert_eq!(
                    (reply.stdout.as_slice(), reply.stderr.as_slice()),
                    (stdout, stderr),
                    "{shell}, lossless {lossless}: {command}"
                );
            }
        }
    }
}

/// Output files that cannot be made fail that command, and the shell lives
/// on (busybox sh exits on a failed redirection of a special builtin).
#[test]
fn output_files_that_cannot_be_made_fail_the_command_not_the_shell() {
    let lines = script("T1", "echo out", None).unwrap()
        + "__vmlab_keep=$__vmlab_d; __vmlab_d=/proc/sys\n"
        + &script("T2", "true", None).unwrap()
        + &script("T3", "true", None).unwrap()
        + "__vmlab_d=$__vmlab_keep\n"
        + &script("T4", "echo alive", None).unwrap();
    for (shell, printed) in under_each_shell(true, &lines) {
        let text = String::from_utf8_lossy(&printed);
        for token in ["T2", "T3"] {
            assert!(text.contains(&format!("{token} fail cannot make output files")), "{shell}: {text}");
        }
        let at = text.find("T4 out").unwrap_or_else(|| panic!("{shell}: the shell died: {text}"));
        let (reply, _) = ReplyParser::new("T4", true).feed(&printed[at..]).unwrap().unwrap();
        assert_eq!(reply.stdout, b"alive\n", "{shell}");
    }
}

/// Without its temporary directory, a copy says so and replies at once (a
/// host waiting for a piece, `ready` or a reply is answered), and the shell
/// lives on.
#[test]
fn a_copy_without_its_directory_fails_at_once_and_the_shell_lives_on() {
    for copy in [copy_in_line("T1", 10, "x", "/nonexistent/x"), copy_out_line("T1", "/", "etc")] {
        let lines = format!("TMPDIR=/proc/sys\n{copy}TMPDIR=/tmp\n{}", script("T2", "echo alive", None).unwrap());
        for (shell, printed) in under_each_shell(true, &lines) {
            let text = String::from_utf8_lossy(&printed);
            let fail = "T1 fail cannot create a temporary directory in /tmp\n";
            assert!(text.starts_with(fail), "{shell}: {text}");
            let (reply, used) = ReplyParser::new("T1", true).feed(&printed[fail.len()..]).unwrap().unwrap();
            assert_eq!(reply.status, 1, "{shell}");
            let rest = &printed[fail.len() + used..];
            let (reply, _) = ReplyParser::new("T2", true).feed(rest).unwrap().unwrap();
            assert_eq!(reply.stdout, b"alive\n", "{shell}: {text}");
        }
    }
}
