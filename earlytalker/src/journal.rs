//! Lines for the systemd journal. Under systemd, stdout and stderr are a stream to
//! journald and `JOURNAL_STREAM` names it (device:inode). There each line starts
//! with a `<N>` syslog priority, which journald takes as the entry's PRIORITY
//! (`SyslogLevelPrefix=`, on by default) and strips, and carries no timestamp of
//! ours (the journal keeps its own). Elsewhere (a terminal, a file) lines are
//! written as before.

use std::os::unix::fs::MetadataExt;

/// Syslog priorities (RFC 5424 severities), as journald reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prio {
    Error = 3,
    Warning = 4,
    /// Normal but significant: an early talker.
    Notice = 5,
    Info = 6,
    Debug = 7,
}

impl Prio {
    pub fn of(level: log::Level) -> Prio {
        match level {
            log::Level::Error => Prio::Error,
            log::Level::Warn => Prio::Warning,
            log::Level::Info => Prio::Info,
            log::Level::Debug | log::Level::Trace => Prio::Debug,
        }
    }

    /// The line prefix journald understands.
    pub fn prefix(self) -> &'static str {
        match self {
            Prio::Error => "<3>",
            Prio::Warning => "<4>",
            Prio::Notice => "<5>",
            Prio::Info => "<6>",
            Prio::Debug => "<7>",
        }
    }
}

/// Whether file descriptor `fd` (1 or 2) is the journal stream systemd gave us.
pub fn is_journal(fd: u32) -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // stat() through /proc/self/fd gives the open file's own device and inode.
    std::fs::metadata(format!("/proc/self/fd/{fd}")).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_are_syslog_severities() {
        assert_eq!(Prio::Notice.prefix(), "<5>");
        assert_eq!(Prio::of(log::Level::Warn), Prio::Warning);
        assert_eq!(Prio::of(log::Level::Error) as u8, 3);
    }
}
