//! The text of `tap-ctl stats`: a JSON object per VBD, laid out as tapdisk's `tapdisk-stats.c`
//! does (`{ "key": value, ... }`, images leaf first).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;

use crate::vbd::Vbd;

/// Appends `text` as a JSON string literal.
fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The stats object of one VBD; `device` is its kernel block device, if any.
pub fn vbd_stats(vbd: &Vbd, device: Option<&Path>) -> String {
    let mut out = String::from("{ \"name\": ");
    push_json_string(&mut out, vbd.params().as_deref().unwrap_or(""));
    if let Some(device) = device {
        out.push_str(", \"blockdev\": ");
        push_json_string(&mut out, &device.to_string_lossy());
    }
    let counters = vbd.counters();
    let _ = write!(
        out,
        ", \"secs\": [ {}, {} ], \"images\": [ ",
        counters.secs[0].load(Ordering::Relaxed),
        counters.secs[1].load(Ordering::Relaxed)
    );
    if let Some(chain) = vbd.chain() {
        for (index, image) in chain.images().iter().enumerate() {
            if index > 0 {
                out.push_str(", ");
            }
            out.push_str("{ \"name\": ");
            push_json_string(&mut out, &image.driver.path().to_string_lossy());
            let hits = &image.counters.hits;
            let fail = &image.counters.fail;
            let disk_type = image.driver.disk_type();
            let _ = write!(
                out,
                ", \"hits\": [ {}, {} ], \"fail\": [ {}, {} ], \"driver\": {{ \"type\": {}, \"name\": \"{}\", \"status\": {} }} }}",
                hits[0].load(Ordering::Relaxed),
                hits[1].load(Ordering::Relaxed),
                fail[0].load(Ordering::Relaxed),
                fail[1].load(Ordering::Relaxed),
                disk_type.number(),
                disk_type.name(),
                image.driver.stats_json().as_deref().unwrap_or("null"),
            );
        }
    }
    let _ = write!(
        out,
        " ], \"FIXME_enospc_redirect_count\": 0, \"nbd_mirror_failed\": 0, \"reqs_outstanding\": {}, \"read_caching\": \"false\" }}",
        vbd.in_flight()
    );
    out
}

/// The stats text for several VBDs (cookie 0xFFFF): a JSON list of their objects.
pub fn list(objects: &[String]) -> String {
    format!("[ {} ]", objects.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_json_strings() {
        let mut out = String::new();
        push_json_string(&mut out, "a\"b\\c\n\u{1}");
        assert_eq!(out, r#""a\"b\\c\n\u0001""#);
    }

    #[test]
    fn closed_vbd_stats_text() {
        let vbd = Vbd::new(4);
        assert_eq!(
            vbd_stats(&vbd, None),
            "{ \"name\": \"\", \"secs\": [ 0, 0 ], \"images\": [  ], \"FIXME_enospc_redirect_count\": 0, \
             \"nbd_mirror_failed\": 0, \"reqs_outstanding\": 0, \"read_caching\": \"false\" }"
        );
        assert_eq!(list(&[]), "[  ]");
        assert!(
            vbd_stats(&vbd, Some(Path::new("/dev/loop3"))).contains("\"blockdev\": \"/dev/loop3\"")
        );
    }
}
