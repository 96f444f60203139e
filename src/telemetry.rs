//! Structured logs with `tracing`: human-readable text, or one JSON object per line.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global logger. Calling it again (as tests do) keeps the first one.
pub fn init(format: LogFormat, filter: &str) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_target(true)
        .with_ansi(std::io::stdout().is_terminal());
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Runs `f` with the log lines of this thread written to a buffer (as text, at every level),
/// and returns them with `f`'s result: for tests of what is logged.
#[cfg(test)]
pub(crate) fn logs_of<T>(f: impl FnOnce() -> T) -> (T, String) {
    use std::sync::{Arc, Mutex};

    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    // With a single subscriber registered, tracing decides whether a log line is wanted from
    // the subscriber of the thread that reaches it first, and remembers: another test's thread,
    // with none, reaching the same line first would silence it here too. A second subscriber
    // that lives for good makes it ask every registered one instead.
    static SECOND: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    SECOND.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .with_writer({
            let buffer = buffer.clone();
            move || Buffer(buffer.clone())
        })
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
    (out, text)
}

#[cfg(test)]
mod tests {
    fn a_line() {
        tracing::warn!("a line two threads reach");
    }

    #[test]
    fn a_line_another_thread_reached_first_is_still_captured() {
        let (_, logs) = super::logs_of(|| {
            // Reached first by a thread with no subscriber, while this one has one.
            std::thread::spawn(a_line).join().unwrap();
            a_line();
        });
        assert!(logs.contains("a line two threads reach"), "{logs:?}");
    }
}
