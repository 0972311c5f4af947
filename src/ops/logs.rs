//! Where log lines go: stderr, as text on a terminal or one JSON object
//! per line.

use std::io::IsTerminal;

/// Installs the global subscriber at `level`; `json` for `-log-json`.
pub fn init(level: tracing::level_filters::LevelFilter, json: bool) {
    let logs = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr);
    if json {
        // One JSON object per line, the event's fields at the top level
        // next to "timestamp", "level", "target" and "message".
        logs.json().flatten_event(true).with_ansi(false).init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
}
