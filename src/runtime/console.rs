//! A machine's serial console: logged to a file and offered line by line to
//! subscribers (`vmlab up` prints them; the driver's `wait_for_console_text`
//! searches them).

use crate::sync::lock;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{mpsc, Arc, Mutex};

/// The console of one machine; it outlives the machine's QEMU processes, so a
/// subscription stays valid across restarts.
#[derive(Clone, Default)]
pub struct Console {
    subscribers: Arc<Mutex<Vec<mpsc::Sender<String>>>>,
}

impl Console {
    /// Every line printed from now on, without its line ending (lossy UTF-8).
    /// Dropping the receiver ends the subscription.
    pub fn subscribe(&self) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel();
        lock(&self.subscribers).push(tx);
        rx
    }

    fn publish(&self, line: String) {
        lock(&self.subscribers).retain(|s| s.send(line.clone()).is_ok());
    }

    /// Copies `serial` to `log` as is and publishes each line; returns at end of file.
    pub(crate) fn pump(&self, serial: impl Read, mut log: File) {
        let mut serial = BufReader::new(serial);
        let mut line = Vec::new();
        loop {
            line.clear();
            match serial.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    // A full disk must not stop the console: subscribers still get the line.
                    let _ = log.write_all(&line);
                    self.publish(text_of(&line));
                }
            }
        }
    }
}

/// Pure: a console line as text, without `\n` or `\r\n`.
fn text_of(line: &[u8]) -> String {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    String::from_utf8_lossy(line).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_text() {
        let cases: [(&[u8], &str); 5] = [
            (b"login: \n", "login: "),
            (b"[    0.1] Linux\r\n", "[    0.1] Linux"),
            (b"no newline at end", "no newline at end"),
            (b"bad \xff byte\n", "bad \u{fffd} byte"),
            (b"\r\r\n", "\r"),
        ];
        for (raw, text) in cases {
            assert_eq!(text_of(raw), text, "{raw:?}");
        }
    }

    #[test]
    fn pump_logs_bytes_and_publishes_lines_to_live_subscribers() {
        let console = Console::default();
        let (a, b) = (console.subscribe(), console.subscribe());
        drop(b);
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let raw: &[u8] = b"one\r\ntwo\n\xffthree";
        console.pump(raw, File::create(&log).unwrap());
        assert_eq!(std::fs::read(&log).unwrap(), raw);
        assert_eq!(a.try_iter().collect::<Vec<_>>(), ["one", "two", "\u{fffd}three"]);
        assert_eq!(console.subscribers.lock().unwrap().len(), 1, "the dropped subscriber is forgotten");
    }
}
