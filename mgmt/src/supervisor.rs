//! Earlier runs of dosd that ended, as the supervisor that restarts it recorded them.
//!
//! The appliance's init (`image/init`) appends one line to `<data dir>/restarts` each
//! time dosd exits and is restarted: `UPTIME exit=STATUS ran=SECONDSs` — the machine's
//! uptime in seconds at the exit, dosd's exit status (a number, or `unknown`) and how
//! long that run lasted. dosd reads the file once at start-up (the file changes only
//! while no dosd runs) and reports it in `GET /v1/node` as `restarts`. A node without
//! such a supervisor has no file and reports none. The file is outside input: lines
//! that do not parse are counted but not shown, and at most [`READ_MAX`] bytes are read.

use std::io::{self, Read};
use std::path::Path;

use serde::Serialize;
use utoipa::ToSchema;

/// The file's name in the data directory.
pub const FILE: &str = "restarts";
/// The most recent exits shown.
pub const RECENT: usize = 10;
/// At most this much of the file is read (its last bytes).
pub const READ_MAX: u64 = 64 << 10;

/// One earlier run of dosd that ended and was restarted.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ExitView {
    /// The machine's uptime, in seconds, when that run ended.
    pub at_uptime_s: f64,
    /// Its exit status: a number, or `unknown` (e.g. killed by a signal the shell
    /// did not report).
    pub exit: String,
    /// How long that run lasted, in seconds.
    pub ran_s: u64,
}

/// What the supervisor recorded (`GET /v1/node` `restarts`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct RestartsView {
    /// Runs of dosd that ended and were restarted (every line of the file, readable or
    /// not; of its last 64 KiB).
    pub total: u64,
    /// The last [`RECENT`] of them that could be read, oldest first.
    pub recent: Vec<ExitView>,
}

/// Parses one line, `UPTIME exit=STATUS ran=SECONDSs`.
pub fn parse_line(line: &str) -> Option<ExitView> {
    let mut words = line.split_ascii_whitespace();
    let at_uptime_s: f64 = words.next()?.parse().ok()?;
    if !at_uptime_s.is_finite() || at_uptime_s < 0.0 {
        return None;
    }
    let exit = words.next()?.strip_prefix("exit=")?;
    if exit.is_empty() || exit.len() > 16 || !exit.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let ran_s = words
        .next()?
        .strip_prefix("ran=")?
        .strip_suffix('s')?
        .parse()
        .ok()?;
    if words.next().is_some() {
        return None;
    }
    Some(ExitView {
        at_uptime_s,
        exit: exit.to_string(),
        ran_s,
    })
}

/// Parses the file's text.
pub fn parse(text: &str) -> RestartsView {
    let mut view = RestartsView::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        view.total += 1;
        if let Some(exit) = parse_line(line) {
            if view.recent.len() == RECENT {
                view.recent.remove(0);
            }
            view.recent.push(exit);
        }
    }
    view
}

/// Reads `path` (its last [`READ_MAX`] bytes); no file: no restarts.
pub fn read(path: &Path) -> io::Result<RestartsView> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(RestartsView::default()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let mut file = file;
    let mut skipped = 0;
    if len > READ_MAX {
        use std::io::{Seek, SeekFrom};
        skipped = len - READ_MAX;
        file.seek(SeekFrom::Start(skipped))?;
    }
    let mut raw = Vec::new();
    file.take(READ_MAX).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    // A cut first line is not a line of its own.
    let text = if skipped > 0 {
        text.split_once('\n').map_or("", |(_, rest)| rest)
    } else {
        &text
    };
    Ok(parse(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_inits_lines() {
        assert_eq!(
            parse_line("31.42 exit=1 ran=3s"),
            Some(ExitView {
                at_uptime_s: 31.42,
                exit: "1".into(),
                ran_s: 3
            })
        );
        assert_eq!(parse_line("5 exit=unknown ran=0s").unwrap().exit, "unknown");
        for bad in [
            "",
            "x exit=1 ran=3s",
            "1 exit= ran=3s",
            "1 exit=1 ran=3",
            "1 code=1 ran=3s",
            "1 exit=1 ran=3s extra",
            "-1 exit=1 ran=3s",
            "NaN exit=1 ran=3s",
            "1 exit=1;rm ran=3s",
        ] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn counts_every_line_and_keeps_the_last_ten() {
        let mut text = String::from("garbage\n\n");
        for k in 0..15 {
            text.push_str(&format!("{}.5 exit={k} ran={k}s\n", 10 + k));
        }
        let view = parse(&text);
        assert_eq!(view.total, 16);
        assert_eq!(view.recent.len(), RECENT);
        assert_eq!(view.recent[0].exit, "5");
        assert_eq!(view.recent[9].ran_s, 14);
    }

    #[test]
    fn reads_a_missing_file_as_none_and_a_long_one_from_its_end() {
        let dir = std::env::temp_dir().join(format!("dosd-supervisor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(read(&dir.join("none")).unwrap(), RestartsView::default());
        let path = dir.join(FILE);
        let line = "123.25 exit=1 ran=2s\n";
        let n = (READ_MAX as usize / line.len()) + 100;
        std::fs::write(&path, line.repeat(n)).unwrap();
        let view = read(&path).unwrap();
        assert_eq!(view.recent.len(), RECENT);
        assert!(view.total < n as u64 && view.total >= (READ_MAX as usize / line.len()) as u64 - 1);
        assert!(view.recent.iter().all(|e| e.ran_s == 2 && e.exit == "1"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        #[test]
        fn never_panics_on_any_text(text in "\\PC{0,400}") {
            let view = parse(&text);
            prop_assert!(view.recent.len() <= RECENT);
            prop_assert!(view.total >= view.recent.len() as u64);
        }
    }
}
