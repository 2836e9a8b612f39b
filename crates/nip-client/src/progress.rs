//! Progress bars for transfers and builds: drawn only when stdout and stderr are terminals, so CI
//! logs and pipes stay quiet.
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Set by `nip build --ci`: no bars or spinners even on a terminal (CI runners with a TTY).
static QUIET: AtomicBool = AtomicBool::new(false);

/// Turns every bar and spinner off for the rest of the process.
pub fn set_quiet() {
    QUIET.store(true, Ordering::Relaxed);
}

fn interactive() -> bool {
    !QUIET.load(Ordering::Relaxed)
        && std::io::stdout().is_terminal()
        && std::io::stderr().is_terminal()
}

/// A byte progress bar of `len`, or `None` when not on a terminal.
pub fn bar(len: u64, msg: &str) -> Option<ProgressBar> {
    if !interactive() {
        return None;
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_message(msg.to_string());
    Some(b)
}

/// A spinner for work of unknown length (a build), or `None` when not on a terminal.
pub fn spinner(msg: &str) -> Option<ProgressBar> {
    if !interactive() {
        return None;
    }
    let s = ProgressBar::new_spinner();
    s.set_message(msg.to_string());
    s.enable_steady_tick(Duration::from_millis(120));
    Some(s)
}

/// A reader that advances a bar as it is read.
pub struct Reader<R> {
    pub inner: R,
    pub bar: Option<ProgressBar>,
}

impl<R: Read> Read for Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(b) = &self.bar {
            if n == 0 {
                b.finish_and_clear();
            } else {
                b.inc(n as u64);
            }
        }
        Ok(n)
    }
}
