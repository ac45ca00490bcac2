//! Progress of the long shell commands (`data import/export`, `db backup/restore`,
//! `pool failover/failback`, `db log-shipping configure`, the mirroring jobs): on a terminal
//! an indicatif bar or spinner on stderr, with each finished line kept above it; otherwise
//! (a log, a pipe, a CI job) plain lines, within one step at most one every 2 s, and never a
//! terminal escape.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Plain output says a step that is still going at most this often.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// One command's progress on stderr.
pub struct Progress {
    /// What the lines start with (`backup`, `imported`, …).
    verb: String,
    /// The bar or spinner, on a terminal.
    bar: Option<ProgressBar>,
    /// Plain output: what was said last, and when.
    last: String,
    last_at: Option<Instant>,
}

impl Progress {
    /// A bar on a terminal, plain lines otherwise.
    pub fn new(verb: &str) -> Progress {
        Progress::with_terminal(verb, std::io::stderr().is_terminal())
    }

    fn with_terminal(verb: &str, terminal: bool) -> Progress {
        let p = Progress {
            verb: verb.to_owned(),
            bar: terminal.then(|| {
                ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
                    .with_style(spinner_style())
            }),
            last: String::new(),
            last_at: None,
        };
        if let Some(bar) = &p.bar {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        p
    }

    fn spinner(&self) {
        if let Some(bar) = &self.bar {
            bar.set_style(spinner_style());
        }
    }

    /// A line of the procedure (a step started or finished): kept on the screen.
    pub fn line(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => {
                bar.println(format!("{}: {line}", self.verb));
                bar.set_message(line.to_owned());
            }
            None => {
                eprintln!("{}: {line}", self.verb);
                self.last = line.to_owned();
                self.last_at = Some(Instant::now());
            }
        }
    }

    /// The current step of a job and how far it is, when known: the bar moves; plain output
    /// says it when the step changes and then at most every 2 s.
    pub fn step(&mut self, step: &str, percent: Option<u8>) {
        match &self.bar {
            Some(bar) => {
                if step != self.last {
                    if !self.last.is_empty() {
                        bar.println(format!("{}: {}", self.verb, self.last));
                    }
                    self.last = step.to_owned();
                }
                match percent {
                    Some(p) => {
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{spinner} [{elapsed_precise}] {bar:30} {pos:>3}% {msg}",
                            )
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                        );
                        bar.set_length(100);
                        bar.set_position(u64::from(p.min(100)));
                    }
                    None => self.spinner(),
                }
                if let Some(bar) = &self.bar {
                    bar.set_message(step.to_owned());
                }
            }
            None => {
                let due = self.last_at.is_none_or(|t| t.elapsed() >= PLAIN_EVERY);
                if step != self.last || due {
                    match percent {
                        Some(p) => eprintln!("{}: {step} {p}%", self.verb),
                        None => eprintln!("{}: {step}", self.verb),
                    }
                    self.last = step.to_owned();
                    self.last_at = Some(Instant::now());
                }
            }
        }
    }

    /// `done` of `total` messages (`total` 0: not known).
    pub fn count(&mut self, done: u64, total: u64) {
        match &self.bar {
            Some(bar) => {
                if total > 0 {
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} messages ({percent}%, {per_sec}, {eta} left)",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar.set_length(total);
                } else {
                    bar.set_message(format!("{} {done} messages", self.verb));
                }
                bar.set_position(done);
            }
            None => {
                let due = self.last_at.is_none_or(|t| t.elapsed() >= PLAIN_EVERY);
                if due || (total > 0 && done == total) {
                    self.last_at = Some(Instant::now());
                    if total > 0 {
                        eprintln!(
                            "{} {done}/{total} messages ({}%)",
                            self.verb,
                            done * 100 / total.max(1)
                        );
                    } else {
                        eprintln!("{} {done} messages", self.verb);
                    }
                }
            }
        }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_output_throttles_a_step_but_not_a_new_one() {
        let mut p = Progress::with_terminal("backup", false);
        p.step("copying", Some(10));
        let first = p.last_at;
        // The same step again at once: not said.
        p.step("copying", Some(11));
        assert_eq!(p.last_at, first);
        // A new step: said at once.
        p.step("verifying", None);
        assert_ne!(p.last_at, first);
        assert_eq!(p.last, "verifying");
    }
}
