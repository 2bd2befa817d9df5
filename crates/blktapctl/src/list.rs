//! `tap-ctl list`: the outer join of allocated minors, running tapdisks and their VBDs, and
//! the two output formats.
//!
//! Rows come from three sources: marker files (minors), control sockets confirmed with a PID
//! request (tapdisks), and each tapdisk's LIST stream (VBDs). A VBD row carries pid, minor,
//! state and image; a tapdisk without VBDs appears with only its pid; an allocated minor that no
//! tapdisk serves appears with only its minor.
//!
//! Every tapdisk is asked at the same time, each within [`LIST_STATS_TIMEOUT`], so one slow
//! tapdisk costs the whole listing at most that long. A tapdisk that does not answer in time
//! (stopped, overloaded) is not taken for dead: its control socket names its pid, and the
//! markers whose `flock` it holds name its minors, so its rows still say `pid=P minor=M`
//! (without state or image, which only it could tell), and the [`Survey`] reports it so that
//! `tap-ctl` can exit non-zero. Entries left by tapdisks that died without detaching (see
//! [`crate::marker`]) are reported as stale.

use std::fmt::Write as _;

use std::time::{Duration, Instant};

use crate::alloc::allocated_minors;
use crate::error::{Error, Result};
use crate::ipc::LIST_STATS_TIMEOUT;
use crate::marker::{recorded_pid, FlockHolders};
use crate::ops::{get_pid_within, list_vbds_within, VbdEntry};
use crate::paths::{parse_ctl_socket_name, ControlDir};

/// One row of `tap-ctl list`; `None` fields are unknown and printed as `-` (tty) or omitted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListRow {
    pub pid: Option<u32>,
    pub minor: Option<u32>,
    pub state: Option<i32>,
    /// Image type, the part of `"type:/path"` before the first `:`.
    pub driver: Option<String>,
    /// Image path, the part of `"type:/path"` after the first `:`.
    pub path: Option<String>,
    /// Why the row is incomplete (a tapdisk that did not answer, a stale marker); shown at
    /// a terminal only, never in the script format.
    pub note: Option<String>,
}

impl ListRow {
    /// The row of one VBD of tapdisk `pid`.
    pub fn from_vbd(pid: u32, vbd: &VbdEntry) -> Self {
        let (driver, path) = split_params(&vbd.params);
        Self {
            pid: Some(pid),
            minor: u32::try_from(vbd.minor).ok(),
            state: Some(vbd.state),
            driver,
            path,
            note: None,
        }
    }

    /// The terminal format: `"%8s %4s %4s %10s %s"` of pid, minor, state, type, path with `-`
    /// for unknown fields (no trailing newline), then the note in parentheses, if any.
    pub fn format_table_row(&self) -> String {
        let dash = || "-".to_owned();
        let pid = self.pid.map_or_else(dash, |p| p.to_string());
        let minor = self.minor.map_or_else(dash, |m| m.to_string());
        let state = self.state.map_or_else(dash, c_alt_hex);
        let driver = self.driver.as_deref().unwrap_or("-");
        let path = self.path.as_deref().unwrap_or("-");
        let line = format!("{pid:>8} {minor:>4} {state:>4} {driver:>10} {path}");
        match &self.note {
            Some(note) => format!("{line}  ({note})"),
            None => line,
        }
    }

    /// The script format: `pid=%d minor=%d state=%#x args=%s:%s`, space separated, each field
    /// omitted when unknown (`args` only when both type and path are known).
    pub fn format_dict(&self) -> String {
        let mut fields = Vec::with_capacity(4);
        if let Some(pid) = self.pid {
            fields.push(format!("pid={pid}"));
        }
        if let Some(minor) = self.minor {
            fields.push(format!("minor={minor}"));
        }
        if let Some(state) = self.state {
            fields.push(format!("state={}", c_alt_hex(state)));
        }
        if let (Some(driver), Some(path)) = (&self.driver, &self.path) {
            fields.push(format!("args={driver}:{path}"));
        }
        fields.join(" ")
    }
}

/// `printf("%#x", value)`: `0` for zero, otherwise `0x` and lowercase hex of the value's bits.
pub fn c_alt_hex(value: i32) -> String {
    let bits = u32::from_ne_bytes(value.to_ne_bytes());
    if bits == 0 {
        "0".to_owned()
    } else {
        let mut out = String::with_capacity(10);
        let _ = write!(out, "{bits:#x}");
        out
    }
}

/// Splits `"type:/path"` at the first `:`. Empty means no image; without a `:` the whole
/// string is taken as the path.
pub fn split_params(params: &str) -> (Option<String>, Option<String>) {
    if params.is_empty() {
        return (None, None);
    }
    match params.split_once(':') {
        Some((driver, path)) => (Some(driver.to_owned()), Some(path.to_owned())),
        None => (None, Some(params.to_owned())),
    }
}

/// One tapdisk and its VBDs (`None` when it did not answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapdiskVbds {
    pub pid: u32,
    pub vbds: Option<Vec<VbdEntry>>,
    /// Minors whose markers this tapdisk holds locked: its rows when it did not answer.
    pub held_minors: Vec<u32>,
}

/// The outer join: VBD rows per tapdisk (in the given order), a pid-only row for a tapdisk
/// with no VBDs, `pid minor` rows for the minors held by a tapdisk that did not answer (a
/// pid-only row if it holds none), then a minor-only row for each allocated minor no
/// tapdisk accounts for.
pub fn join(minors: &[u32], tapdisks: &[TapdiskVbds]) -> Vec<ListRow> {
    let mut rows = Vec::new();
    let mut orphans: Vec<u32> = minors.to_vec();
    for tapdisk in tapdisks {
        let claimed: Vec<ListRow> = match tapdisk.vbds.as_deref() {
            Some(vbds) => vbds
                .iter()
                .map(|vbd| ListRow::from_vbd(tapdisk.pid, vbd))
                .collect(),
            None => tapdisk
                .held_minors
                .iter()
                .map(|minor| ListRow {
                    pid: Some(tapdisk.pid),
                    minor: Some(*minor),
                    note: Some("tapdisk did not answer".to_owned()),
                    ..ListRow::default()
                })
                .collect(),
        };
        if claimed.is_empty() {
            rows.push(ListRow {
                pid: Some(tapdisk.pid),
                note: tapdisk
                    .vbds
                    .is_none()
                    .then(|| "tapdisk did not answer".to_owned()),
                ..ListRow::default()
            });
        }
        for row in claimed {
            if let Some(minor) = row.minor {
                orphans.retain(|m| *m != minor);
            }
            rows.push(row);
        }
    }
    rows.extend(orphans.into_iter().map(|minor| ListRow {
        minor: Some(minor),
        ..ListRow::default()
    }));
    rows
}

/// What a `tap-ctl list` found, beyond its rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Survey {
    /// The rows, joined as [`join`] does.
    pub rows: Vec<ListRow>,
    /// Tapdisks whose control socket exists and accepts connections but which did not
    /// answer within [`LIST_STATS_TIMEOUT`] (or answered garbage): their rows are
    /// incomplete.
    pub silent: Vec<(u32, Error)>,
    /// Leftovers of tapdisks that died without detaching, one sentence each (the next
    /// `allocate` reclaims them unless a ublk device waits for recovery).
    pub stale: Vec<String>,
}

impl Survey {
    /// The listing as a result: the rows, or the first silent tapdisk's error.
    pub fn into_rows(self) -> Result<Vec<ListRow>> {
        match self.silent.into_iter().next() {
            Some((_, error)) => Err(error),
            None => Ok(self.rows),
        }
    }
}

/// How one tapdisk answered.
enum Answer {
    /// Its VBDs (possibly none), under the pid it reported.
    Vbds(u32, Vec<VbdEntry>),
    /// Nobody listens on its socket (the tapdisk died or exited meanwhile).
    Gone,
    /// It is there but did not answer properly in time.
    Silent(Error),
}

/// Asks the tapdisk on `ctl<id>` for its pid and VBDs, all within `timeout`.
fn ask(dir: &ControlDir, id: u32, timeout: Duration) -> Answer {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let answer = get_pid_within(dir, id, timeout)
        .and_then(|pid| list_vbds_within(dir, pid, left()).map(|vbds| (pid, vbds)));
    match answer {
        Ok((pid, vbds)) => Answer::Vbds(pid, vbds),
        Err(e) if is_gone(&e) => Answer::Gone,
        Err(e) => Answer::Silent(e),
    }
}

/// Errors that mean no tapdisk is behind the socket (any more).
fn is_gone(error: &Error) -> bool {
    matches!(
        error.errno(),
        libc::ECONNREFUSED | libc::ENOENT | libc::ECONNRESET | libc::EPIPE
    )
}

/// Tapdisks asked at once (one thread each).
const PARALLEL_QUERIES: usize = 64;

/// Asks every id in `ids` at once (in batches of [`PARALLEL_QUERIES`]); answers in order.
fn ask_all(dir: &ControlDir, ids: &[u32]) -> Vec<(u32, Answer)> {
    let mut answers = Vec::with_capacity(ids.len());
    for batch in ids.chunks(PARALLEL_QUERIES) {
        std::thread::scope(|scope| {
            let asking: Vec<_> = batch
                .iter()
                .map(|&id| scope.spawn(move || ask(dir, id, LIST_STATS_TIMEOUT)))
                .collect();
            for (handle, &id) in asking.into_iter().zip(batch) {
                let answer = handle.join().unwrap_or_else(|_| {
                    Answer::Silent(Error::new(libc::EIO, format!("asking tapdisk {id} failed")))
                });
                answers.push((id, answer));
            }
        });
    }
    answers
}

/// Ids of the control sockets in `dir` (`ctl<pid>`), ascending.
fn control_socket_ids(dir: &ControlDir) -> Result<Vec<u32>> {
    let entries = match std::fs::read_dir(dir.root()) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::from_io(
                &e,
                format!("reading control directory {}", dir.root().display()),
            ))
        }
    };
    let mut ids: Vec<u32> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().to_str().and_then(parse_ctl_socket_name))
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Joins `minors` with the answers of the tapdisks on `ids` (see [`Survey`]).
fn survey_of(dir: &ControlDir, minors: &[u32], ids: &[u32]) -> Survey {
    let locks = FlockHolders::read();
    let holder = |minor: u32| locks.as_ref()?.holder(&dir.marker_path(minor));
    let mut survey = Survey::default();
    let mut tapdisks = Vec::new();
    for (id, answer) in ask_all(dir, ids) {
        match answer {
            Answer::Vbds(pid, vbds) => tapdisks.push(TapdiskVbds {
                pid,
                vbds: Some(vbds),
                held_minors: Vec::new(),
            }),
            Answer::Silent(error) => {
                let held_minors = minors
                    .iter()
                    .copied()
                    .filter(|minor| holder(*minor) == Some(id))
                    .collect();
                tapdisks.push(TapdiskVbds {
                    pid: id,
                    vbds: None,
                    held_minors,
                });
                survey.silent.push((id, error));
            }
            Answer::Gone => survey.stale.push(format!(
                "control socket {} is stale: tapdisk {id} is gone",
                dir.ctl_socket_path(id).display()
            )),
        }
    }
    survey.rows = join(minors, &tapdisks);
    // Minors no tapdisk accounts for: allocated, held by someone unknown, or stale.
    for row in survey.rows.iter_mut().filter(|row| row.pid.is_none()) {
        let Some(minor) = row.minor else { continue };
        if locks.is_none() || holder(minor).is_some() {
            continue;
        }
        let Some(pid) = recorded_pid(&dir.marker_path(minor)) else {
            continue;
        };
        let (note, sentence) = if dir.recovery_state_path(minor).exists() {
            (
                format!("stale: tapdisk {pid} is gone; its ublk device awaits `tap-ctl recover -m {minor}`"),
                format!("minor {minor} is stale: tapdisk {pid} died without detaching it; its ublk device awaits `tap-ctl recover -m {minor}`"),
            )
        } else {
            (
                format!("stale: tapdisk {pid} is gone"),
                format!("minor {minor} is stale: tapdisk {pid} died without detaching it; the next allocate reclaims it"),
            )
        };
        row.note = Some(note);
        survey.stale.push(sentence);
    }
    survey
}

/// Every row of `tap-ctl list` (the 3-way join over `dir`), with the tapdisks that did not
/// answer and the stale entries.
pub fn survey(dir: &ControlDir) -> Result<Survey> {
    let minors = allocated_minors(dir)?;
    let ids = control_socket_ids(dir)?;
    Ok(survey_of(dir, &minors, &ids))
}

/// The rows of one tapdisk only (`tap-ctl list -p PID`): its VBDs, a pid-only row when it
/// has none, nothing when nobody listens on its socket; when it does not answer, the
/// minors whose markers it holds.
pub fn survey_pid(dir: &ControlDir, pid: u32) -> Result<Survey> {
    let minors = allocated_minors(dir)?;
    let mut survey = survey_of(dir, &minors, &[pid]);
    survey.rows.retain(|row| row.pid == Some(pid));
    survey.stale.clear();
    Ok(survey)
}

/// Every row of `tap-ctl list`; fails when some tapdisk did not answer ([`survey`]).
pub fn list(dir: &ControlDir) -> Result<Vec<ListRow>> {
    survey(dir)?.into_rows()
}

/// The rows of tapdisk `pid` ([`survey_pid`]); fails when it did not answer.
pub fn list_pid(dir: &ControlDir, pid: u32) -> Result<Vec<ListRow>> {
    survey_pid(dir, pid)?.into_rows()
}

/// Row filters of `tap-ctl list` (`-p -m -t -f`), with the C tool's semantics: a type or file
/// filter only rejects rows whose type/path is known and different.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub pid: Option<u32>,
    pub minor: Option<u32>,
    pub driver: Option<String>,
    pub path: Option<String>,
}

impl ListFilter {
    /// Whether `row` passes the filter.
    pub fn matches(&self, row: &ListRow) -> bool {
        if self.minor.is_some() && row.minor != self.minor {
            return false;
        }
        if self.pid.is_some() && row.pid != self.pid {
            return false;
        }
        if let (Some(want), Some(have)) = (&self.driver, &row.driver) {
            if want != have {
                return false;
            }
        }
        if let (Some(want), Some(have)) = (&self.path, &row.path) {
            if want != have {
                return false;
            }
        }
        true
    }
}

/// The minor on which `driver:path` is open (either part `None` = any). `ENOENT` if none.
pub fn find_minor(dir: &ControlDir, driver: Option<&str>, path: Option<&str>) -> Result<u32> {
    list(dir)?
        .into_iter()
        .filter(|row| driver.is_none() || row.driver.as_deref() == driver)
        .filter(|row| path.is_none() || row.path.as_deref() == path)
        .find_map(|row| row.minor)
        .ok_or_else(|| {
            Error::new(
                libc::ENOENT,
                format!(
                    "no VBD has {}:{} open",
                    driver.unwrap_or("*"),
                    path.unwrap_or("*")
                ),
            )
        })
}

/// The pid of the tapdisk serving `minor`. `ENOENT` if none.
pub fn find_pid(dir: &ControlDir, minor: u32) -> Result<u32> {
    list(dir)?
        .into_iter()
        .filter(|row| row.minor == Some(minor))
        .find_map(|row| row.pid)
        .ok_or_else(|| Error::new(libc::ENOENT, format!("no tapdisk serves minor {minor}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vbd(minor: i32, state: i32, params: &str) -> VbdEntry {
        VbdEntry {
            minor,
            state,
            params: params.to_owned(),
        }
    }

    #[test]
    fn c_alt_hex_matches_printf() {
        assert_eq!(c_alt_hex(0), "0");
        assert_eq!(c_alt_hex(2), "0x2");
        assert_eq!(c_alt_hex(0x2a), "0x2a");
        assert_eq!(c_alt_hex(0x200), "0x200");
        assert_eq!(c_alt_hex(-2), "0xfffffffe");
    }

    #[test]
    fn split_params_at_first_colon() {
        assert_eq!(
            split_params("vhd:/a:b.vhd"),
            (Some("vhd".to_owned()), Some("/a:b.vhd".to_owned()))
        );
        assert_eq!(split_params(""), (None, None));
        assert_eq!(split_params("/bare"), (None, Some("/bare".to_owned())));
    }

    #[test]
    fn join_is_a_three_way_outer_join() {
        let tapdisks = [
            TapdiskVbds {
                pid: 100,
                vbds: Some(vec![
                    vbd(0, 0, "vhd:/srv/a.vhd"),
                    vbd(2, 0x2a, "aio:/dev/sdb"),
                ]),
                held_minors: Vec::new(),
            },
            TapdiskVbds {
                pid: 200,
                vbds: Some(vec![]),
                held_minors: Vec::new(),
            },
            TapdiskVbds {
                pid: 300,
                vbds: None,
                held_minors: Vec::new(),
            },
            TapdiskVbds {
                pid: 400,
                vbds: Some(vec![vbd(5, 0x2, "")]),
                held_minors: Vec::new(),
            },
        ];
        let rows = join(&[0, 1, 2, 3, 5], &tapdisks);
        let dicts: Vec<String> = rows.iter().map(ListRow::format_dict).collect();
        assert_eq!(
            dicts,
            [
                "pid=100 minor=0 state=0 args=vhd:/srv/a.vhd",
                "pid=100 minor=2 state=0x2a args=aio:/dev/sdb",
                "pid=200",
                "pid=300",
                "pid=400 minor=5 state=0x2",
                "minor=1",
                "minor=3",
            ]
        );
    }

    #[test]
    fn a_silent_tapdisk_keeps_the_minors_it_holds() {
        let tapdisks = [
            TapdiskVbds {
                pid: 100,
                vbds: None,
                held_minors: vec![1, 3],
            },
            TapdiskVbds {
                pid: 200,
                vbds: None,
                held_minors: vec![],
            },
        ];
        let rows = join(&[0, 1, 3], &tapdisks);
        let dicts: Vec<String> = rows.iter().map(ListRow::format_dict).collect();
        assert_eq!(
            dicts,
            ["pid=100 minor=1", "pid=100 minor=3", "pid=200", "minor=0"]
        );
        assert_eq!(
            rows[0].format_table_row(),
            "     100    1    -          - -  (tapdisk did not answer)"
        );
    }

    #[test]
    fn table_rows_are_c_formatted() {
        let rows = join(
            &[0, 7],
            &[
                TapdiskVbds {
                    pid: 4242,
                    vbds: Some(vec![vbd(0, 0x2a, "vhd:/srv/a.vhd")]),
                    held_minors: Vec::new(),
                },
                TapdiskVbds {
                    pid: 5,
                    vbds: Some(vec![]),
                    held_minors: Vec::new(),
                },
            ],
        );
        let table: Vec<String> = rows.iter().map(ListRow::format_table_row).collect();
        assert_eq!(
            table,
            [
                "    4242    0 0x2a        vhd /srv/a.vhd",
                "       5    -    -          - -",
                "       -    7    -          - -",
            ]
        );
        // Wide values are not truncated (printf field widths are minimums).
        let wide = ListRow {
            pid: Some(123_456_789),
            minor: Some(16383),
            state: Some(0x200),
            driver: Some("verylongtype".to_owned()),
            path: Some("/p".to_owned()),
            note: None,
        };
        assert_eq!(
            wide.format_table_row(),
            "123456789 16383 0x200 verylongtype /p"
        );
    }

    #[test]
    fn dict_omits_args_unless_type_and_path_known() {
        let row = ListRow {
            pid: None,
            minor: Some(3),
            state: Some(0),
            driver: None,
            path: Some("/bare".to_owned()),
            note: None,
        };
        assert_eq!(row.format_dict(), "minor=3 state=0");
        assert_eq!(ListRow::default().format_dict(), "");
    }

    #[test]
    fn filters_follow_c_semantics() {
        let running = ListRow::from_vbd(10, &vbd(1, 0, "vhd:/x.vhd"));
        let orphan = ListRow {
            minor: Some(4),
            ..ListRow::default()
        };
        let by_type = ListFilter {
            driver: Some("aio".to_owned()),
            ..ListFilter::default()
        };
        assert!(!by_type.matches(&running));
        assert!(
            by_type.matches(&orphan),
            "rows without a type pass a type filter"
        );
        let by_file = ListFilter {
            path: Some("/x.vhd".to_owned()),
            ..ListFilter::default()
        };
        assert!(by_file.matches(&running));
        let by_minor = ListFilter {
            minor: Some(4),
            ..ListFilter::default()
        };
        assert!(!by_minor.matches(&running));
        assert!(by_minor.matches(&orphan));
        let by_pid = ListFilter {
            pid: Some(10),
            ..ListFilter::default()
        };
        assert!(by_pid.matches(&running));
        assert!(!by_pid.matches(&orphan));
    }
}
