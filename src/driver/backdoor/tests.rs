//! The shell's I/O against a fake guest on a socket pair: replies asked
//! for again, a lost end found by the probe.

use super::framing::tests::reply;
use super::*;

/// Reads what the host sends up to the end of the line that runs a
/// command or asks for its reply again; the token it gives.
fn token_of(guest: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8];
    loop {
        guest.read_exact(&mut byte).unwrap();
        if byte[0] != b'\n' {
            line.push(byte[0]);
            continue;
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        let words: Vec<&str> = text.split(' ').collect();
        if matches!(words[0], "__vmlab_r" | "__vmlab_reply") {
            return words[1].to_string();
        }
        line.clear();
    }
}

#[test]
fn a_short_reply_is_asked_for_again_without_rerunning_the_command() {
    let (host, mut guest) = UnixStream::pair().unwrap();
    let mut shell = Shell::new(host, "server").unwrap();
    let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    let fake = {
        let data = data.clone();
        std::thread::spawn(move || {
            let first = token_of(&mut guest);
            let whole = String::from_utf8(reply(&first, &data, b"", 0)).unwrap();
            let second_line = whole.lines().nth(2).unwrap().to_string();
            let lost: String = whole.lines().filter(|l| *l != second_line).map(|l| format!("{l}\n")).collect();
            guest.write_all(lost.as_bytes()).unwrap();
            let again = token_of(&mut guest);
            assert_ne!(again, first);
            guest.write_all(&reply(&again, &data, b"", 0)).unwrap();
            guest
        })
    };
    let out = shell.run("produce", Some(Duration::from_secs(60)), &mut || Ok(()), None).unwrap();
    assert_eq!((out.status, out.stdout), (0, data));
    drop(fake.join().unwrap());
}

/// The reply's end line is lost: without the probe, the host would wait
/// for the command's whole timeout (here an hour).
#[test]
fn a_lost_end_is_found_by_the_probe_and_the_reply_asked_for_again() {
    let (host, mut guest) = UnixStream::pair().unwrap();
    let mut shell = Shell::new(host, "server").unwrap();
    let fake = std::thread::spawn(move || {
        let first = token_of(&mut guest);
        let whole = String::from_utf8(reply(&first, b"hello\n", b"", 0)).unwrap();
        let without_end: String = whole.lines().filter(|l| !l.contains(" end ")).map(|l| format!("{l}\n")).collect();
        guest.write_all(without_end.as_bytes()).unwrap();
        // What comes next is the probe, once the host has heard nothing for a while.
        let mut probe = vec![0u8; probe_line(&first).len()];
        guest.read_exact(&mut probe).unwrap();
        assert_eq!(String::from_utf8(probe).unwrap(), probe_line(&first));
        guest.write_all(format!("{first} probe\n").as_bytes()).unwrap();
        let again = token_of(&mut guest);
        guest.write_all(&reply(&again, b"hello\n", b"", 0)).unwrap();
        guest
    });
    let started = Instant::now();
    let out = shell.run("echo hello", Some(Duration::from_secs(3600)), &mut || Ok(()), None).unwrap();
    assert_eq!((out.status, out.stdout), (0, b"hello\n".to_vec()));
    assert!(started.elapsed() < Duration::from_secs(60), "waited {:?}", started.elapsed());
    drop(fake.join().unwrap());
    let mut p = ReplyParser::new("T1", false);
    assert_eq!(p.feed(b"T1 out\nT1 err\nT1 probe\n").unwrap_err(), "the reply's end was lost on the console");
}

/// A command that ended as its timeout passed: the stop cut the program
/// sending its output, and the reply came back short. It is asked for
/// again (the guest keeps the files), once, on a data port too.
#[test]
fn a_reply_cut_by_the_stop_is_asked_for_again() {
    let (host, mut guest) = UnixStream::pair().unwrap();
    let mut shell = Shell::data_port(host, "server").unwrap();
    let (stopped_tx, stopped_rx) = std::sync::mpsc::channel();
    let fake = std::thread::spawn(move || {
        let first = token_of(&mut guest);
        // Nothing until the host has stopped the command, then a cut reply.
        stopped_rx.recv().unwrap();
        let cut = String::from_utf8(reply(&first, b"hel", b"", 143)).unwrap().replace("end 143 3 0", "end 143 6 0");
        guest.write_all(cut.as_bytes()).unwrap();
        let again = token_of(&mut guest);
        assert_ne!(again, first);
        guest.write_all(&reply(&again, b"hello\n", b"", 143)).unwrap();
        guest
    });
    let mut signals = Vec::new();
    let mut stop = |signal, _: Alive| {
        signals.push(signal);
        stopped_tx.send(()).unwrap();
        Ok(())
    };
    let before = recoveries().0;
    let out = shell.run("echo hello", Some(Duration::from_secs(1)), &mut || Ok(()), Some(&mut stop)).unwrap();
    assert_eq!((out.status, out.stdout, out.timed_out), (143, b"hello\n".to_vec(), true));
    assert_eq!(signals, [Signal::Term]);
    assert!(recoveries().0 > before, "the re-ask is counted");
    drop(fake.join().unwrap());
}
