//! Progress bars on stderr while a scenario ramps and holds (hidden when
//! stderr is not a terminal, as in CI).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting to `len`.
pub fn bar(len: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:28} [{bar:40}] {human_pos}/{human_len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// Sleeps `how_long`, showing a bar; `tick` runs about every 200 ms (to
/// sample while holding).
pub fn hold(how_long: Duration, message: &str, mut tick: impl FnMut()) {
    let bar = bar(how_long.as_secs().max(1), message);
    let started = Instant::now();
    while started.elapsed() < how_long {
        std::thread::sleep(
            Duration::from_millis(200).min(how_long.saturating_sub(started.elapsed())),
        );
        tick();
        bar.set_position(started.elapsed().as_secs());
    }
    bar.finish_and_clear();
}
