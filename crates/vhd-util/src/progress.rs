//! A progress bar on stderr, drawn only when stderr is a terminal.

use std::io::{IsTerminal, Write};

/// Draws `label: NN.NN%` updates on stderr when it is a terminal.
#[derive(Debug)]
pub struct Bar {
    label: &'static str,
    enabled: bool,
    last: Option<u64>,
}

impl Bar {
    /// A bar with `label`; inactive when stderr is not a terminal.
    pub fn new(label: &'static str) -> Self {
        Self {
            label,
            enabled: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    /// Updates the bar.
    pub fn update(&mut self, done: u64, total: u64) {
        if !self.enabled || total == 0 {
            return;
        }
        let per_mille = done.saturating_mul(1000) / total;
        if self.last == Some(per_mille) {
            return;
        }
        self.last = Some(per_mille);
        let mut e = std::io::stderr();
        let _ = write!(
            e,
            "\r{}: {:3}.{}%",
            self.label,
            per_mille / 10,
            per_mille % 10
        );
        if done >= total {
            let _ = writeln!(e);
        }
        let _ = e.flush();
    }
}
