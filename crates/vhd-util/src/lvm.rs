//! Logical volumes of an LVM volume group, read without activating them,
//! for `vhd-util scan -l VG`.
//!
//! Like the C tool, the layout comes from lvm2's reporting commands run as
//! subprocesses (here with JSON output):
//! `vgs --units b -o vg_name,vg_extent_size,pv_name,pe_start VG` gives the
//! extent size and where each physical volume's first extent starts, and
//! `lvs --segments --units b -o lv_name,lv_size,segtype,seg_start,seg_size,devices VG`
//! gives every segment of every volume (`devices` is `PV(first extent)`).
//! A volume is then read straight from its physical volumes at its
//! segments' offsets ([`VolumeFile`]), so inactive volumes (no
//! `/dev/VG/LV` node, the normal state on a storage-manager host) scan as
//! well as active ones. Reads use `O_DIRECT`, as the C tool does: a volume
//! may be active and written through its device-mapper node, whose page
//! cache is not the physical volume's.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::Command;

use serde_json::Value;
use vhd::BlockFile;

/// One logical volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Volume name (`VHD-<uuid>`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Segments in volume order.
    pub segments: Vec<Segment>,
}

/// A run of a volume's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset in the volume.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where the run lies on a physical volume; `None` for anything but a
    /// linear segment (striped, mirrored, thin), which is not read.
    pub location: Option<(String, u64)>,
}

/// Lists the logical volumes of `vg` with their segments. The error says
/// which command failed and why.
pub fn list_volumes(vg: &str) -> Result<Vec<Volume>, String> {
    let vgs = report(
        "vgs",
        &["-o", "vg_name,vg_extent_size,pv_name,pe_start", vg],
    )?;
    let (extent_size, pe_starts) = parse_physical_volumes(&vgs, vg)?;
    let lvs = report(
        "lvs",
        &[
            "--segments",
            "-o",
            "lv_name,lv_size,segtype,seg_start,seg_size,devices",
            vg,
        ],
    )?;
    parse_volumes(&lvs, extent_size, &pe_starts)
}

/// Runs an lvm2 reporting command with JSON output in bytes; returns stdout.
fn report(command: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(command)
        .args(["--reportformat", "json", "--units", "b", "--nosuffix"])
        .args(args)
        .output()
        .map_err(|e| format!("{command}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{command} {}: {}: {}",
            args.last().copied().unwrap_or_default(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("{command}: output is not UTF-8: {e}"))
}

/// The rows of a JSON report (`{"report": [{"<kind>": [rows]}]}`).
fn rows<'a>(json: &'a Value, kind: &str) -> Result<&'a Vec<Value>, String> {
    json.get("report")
        .and_then(|r| r.get(0))
        .and_then(|r| r.get(kind))
        .and_then(Value::as_array)
        .ok_or_else(|| format!("no \"{kind}\" rows in the lvm report"))
}

fn field<'a>(row: &'a Value, name: &str) -> Result<&'a str, String> {
    row.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("lvm report row without {name}: {row}"))
}

fn number(row: &Value, name: &str) -> Result<u64, String> {
    let text = field(row, name)?;
    text.trim()
        .parse()
        .map_err(|_| format!("lvm report: {name} {text:?} is not a number of bytes"))
}

/// Parses the `vgs` report: the extent size and each physical volume's
/// `pe_start`.
pub fn parse_physical_volumes(json: &str, vg: &str) -> Result<(u64, HashMap<String, u64>), String> {
    let json: Value = serde_json::from_str(json).map_err(|e| format!("vgs report: {e}"))?;
    let mut extent_size = None;
    let mut pe_starts = HashMap::new();
    for row in rows(&json, "vg")? {
        if field(row, "vg_name")? != vg {
            return Err(format!(
                "vgs reported volume group {:?}, not {vg:?}",
                field(row, "vg_name")?
            ));
        }
        extent_size = Some(number(row, "vg_extent_size")?);
        pe_starts.insert(field(row, "pv_name")?.to_string(), number(row, "pe_start")?);
    }
    match extent_size {
        Some(size) if size > 0 => Ok((size, pe_starts)),
        _ => Err(format!("vgs reported no physical volume of {vg}")),
    }
}

/// Parses the `lvs --segments` report into volumes (in report order).
pub fn parse_volumes(
    json: &str,
    extent_size: u64,
    pe_starts: &HashMap<String, u64>,
) -> Result<Vec<Volume>, String> {
    let json: Value = serde_json::from_str(json).map_err(|e| format!("lvs report: {e}"))?;
    let mut volumes: Vec<Volume> = Vec::new();
    for row in rows(&json, "seg")? {
        let name = field(row, "lv_name")?;
        let segment = Segment {
            start: number(row, "seg_start")?,
            len: number(row, "seg_size")?,
            location: if field(row, "segtype")? == "linear" {
                Some(locate(field(row, "devices")?, extent_size, pe_starts)?)
            } else {
                None
            },
        };
        match volumes.last_mut() {
            Some(v) if v.name == name => v.segments.push(segment),
            _ => volumes.push(Volume {
                name: name.to_string(),
                size: number(row, "lv_size")?,
                segments: vec![segment],
            }),
        }
    }
    for v in &mut volumes {
        v.segments.sort_by_key(|s| s.start);
    }
    Ok(volumes)
}

/// `PV(first extent)` of a linear segment -> (PV, byte offset on it).
fn locate(
    devices: &str,
    extent_size: u64,
    pe_starts: &HashMap<String, u64>,
) -> Result<(String, u64), String> {
    let bad = || format!("lvm report: cannot read the segment location {devices:?}");
    let (pv, rest) = devices.rsplit_once('(').ok_or_else(bad)?;
    let extent: u64 = rest
        .strip_suffix(')')
        .ok_or_else(bad)?
        .parse()
        .map_err(|_| bad())?;
    let pe_start = pe_starts
        .get(pv)
        .ok_or_else(|| format!("segment on {pv}, which vgs did not list"))?;
    let offset = extent
        .checked_mul(extent_size)
        .and_then(|o| o.checked_add(*pe_start))
        .ok_or_else(bad)?;
    Ok((pv.to_string(), offset))
}

/// Alignment of `O_DIRECT` transfers (covers 512- and 4096-byte sectors).
const DIRECT_ALIGN: usize = 4096;

/// A physical volume opened for reading.
#[derive(Debug)]
struct PhysicalVolume {
    file: File,
    direct: bool,
}

impl PhysicalVolume {
    /// Opens `path` with `O_DIRECT`, or without where the file system
    /// refuses it (as the C tool's `open_optional_odirect`).
    fn open(path: &str) -> io::Result<Self> {
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(file) => Ok(Self { file, direct: true }),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Self {
                file: File::open(path)?,
                direct: false,
            }),
            Err(e) => Err(e),
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !self.direct {
            return self.file.read_exact_at(buf, offset);
        }
        let align = DIRECT_ALIGN as u64;
        let start = offset / align * align;
        let end = (offset + buf.len() as u64).div_ceil(align) * align;
        let len = usize::try_from(end - start)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "read too large"))?;
        let mut raw = vec![0u8; len + DIRECT_ALIGN];
        let shift = raw.as_ptr().align_offset(DIRECT_ALIGN);
        let aligned = &mut raw[shift..shift + len];
        self.file.read_exact_at(aligned, start)?;
        let skip = usize::try_from(offset - start).unwrap_or(0);
        buf.copy_from_slice(&aligned[skip..skip + buf.len()]);
        Ok(())
    }
}

/// A logical volume read from its physical volumes (read-only).
#[derive(Debug)]
pub struct VolumeFile {
    name: String,
    size: u64,
    /// `(segment, index into pvs)`.
    segments: Vec<(Segment, Option<usize>)>,
    pvs: Vec<PhysicalVolume>,
}

impl VolumeFile {
    /// Opens the physical volumes `volume` lies on. Fails with `ENOSYS`
    /// when its first segment is not linear (as the C tool).
    pub fn open(volume: &Volume) -> io::Result<Self> {
        if volume
            .segments
            .first()
            .is_none_or(|s| s.location.is_none() || s.start != 0)
        {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        let mut names: Vec<&str> = Vec::new();
        let mut pvs = Vec::new();
        let mut segments = Vec::new();
        for s in &volume.segments {
            let index = match &s.location {
                None => None,
                Some((pv, _)) => Some(match names.iter().position(|n| n == pv) {
                    Some(i) => i,
                    None => {
                        pvs.push(PhysicalVolume::open(pv)?);
                        names.push(pv);
                        pvs.len() - 1
                    }
                }),
            };
            segments.push((s.clone(), index));
        }
        Ok(Self {
            name: volume.name.clone(),
            size: volume.size,
            segments,
            pvs,
        })
    }

    fn read_only(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: volumes are read from their physical volumes read-only",
                self.name
            ),
        )
    }
}

impl BlockFile for VolumeFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{}: read past the volume's end", self.name),
                )
            })?;
        let mut at = offset;
        while at < end {
            let (seg, pv) = self
                .segments
                .iter()
                .find(|(s, _)| s.start <= at && at < s.start + s.len)
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{}: no segment holds offset {at}", self.name),
                    )
                })?;
            let (Some(pv), Some((_, pv_offset))) = (pv, &seg.location) else {
                return Err(io::Error::from_raw_os_error(libc::ENOSYS));
            };
            let n = (end - at).min(seg.start + seg.len - at);
            let from = usize::try_from(at - offset).unwrap_or(0);
            let to = from + usize::try_from(n).unwrap_or(0);
            self.pvs[*pv].read_exact_at(&mut buf[from..to], pv_offset + (at - seg.start))?;
            at += n;
        }
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(self.read_only())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(self.read_only())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // What lvm2 2.03 prints for a VG on /dev/loop0 with 4 MiB extents:
    // VHD-a grown once (two segments), VHD-b in between, a striped LV.
    const VGS: &str = r#"  {
      "report": [
          {
              "vg": [
                  {"vg_name":"VG_XenStorage-x", "vg_extent_size":"4194304", "pv_name":"/dev/loop0", "pe_start":"1048576"}
              ]
          }
      ]
  }"#;
    const LVS: &str = r#"  {
      "report": [
          {
              "seg": [
                  {"lv_name":"VHD-a", "lv_size":"12582912", "segtype":"linear", "seg_start":"0", "seg_size":"8388608", "devices":"/dev/loop0(0)"},
                  {"lv_name":"VHD-a", "lv_size":"12582912", "segtype":"linear", "seg_start":"8388608", "seg_size":"4194304", "devices":"/dev/loop0(3)"},
                  {"lv_name":"VHD-b", "lv_size":"4194304", "segtype":"linear", "seg_start":"0", "seg_size":"4194304", "devices":"/dev/loop0(2)"},
                  {"lv_name":"st", "lv_size":"8388608", "segtype":"striped", "seg_start":"0", "seg_size":"8388608", "devices":"/dev/loop0(4),/dev/loop1(0)"}
              ]
          }
      ]
  }"#;

    #[test]
    fn reports_give_each_segment_its_place_on_the_physical_volume() {
        let (extent, pvs) = parse_physical_volumes(VGS, "VG_XenStorage-x").unwrap();
        assert_eq!(extent, 4 << 20);
        assert_eq!(pvs["/dev/loop0"], 1 << 20);
        let v = parse_volumes(LVS, extent, &pvs).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!((v[0].name.as_str(), v[0].size), ("VHD-a", 12 << 20));
        let at = |s: &Segment| s.location.clone().unwrap().1;
        assert_eq!(at(&v[0].segments[0]), 1 << 20);
        assert_eq!(at(&v[0].segments[1]), (1 << 20) + 3 * (4 << 20));
        assert_eq!(v[0].segments[1].start, 8 << 20);
        assert_eq!(at(&v[1].segments[0]), (1 << 20) + 2 * (4 << 20));
        assert_eq!(v[2].segments[0].location, None);
        assert_eq!(
            VolumeFile::open(&v[2]).unwrap_err().raw_os_error(),
            Some(libc::ENOSYS)
        );
        assert!(parse_physical_volumes(VGS, "other").is_err());
        assert!(parse_volumes("{}", extent, &pvs).is_err());
        assert!(parse_volumes(&LVS.replace("(3)", "(x)"), extent, &pvs).is_err());
    }

    #[test]
    fn a_volume_reads_across_its_segments() {
        // A "physical volume" file: extents of 4 KiB after a 1 KiB pe_start.
        let d = tempfile::tempdir().unwrap();
        let pv = d.path().join("pv");
        let data: Vec<u8> = (0..(1024 + 4 * 4096))
            .map(|i: u32| (i % 251) as u8)
            .collect();
        std::fs::write(&pv, &data).unwrap();
        let pv = pv.display().to_string();
        let seg = |start: u64, extent: u64| Segment {
            start,
            len: 4096,
            location: Some((pv.clone(), 1024 + extent * 4096)),
        };
        let v = Volume {
            name: "VHD-a".into(),
            size: 8192,
            segments: vec![seg(0, 2), seg(4096, 0)],
        };
        let f = VolumeFile::open(&v).unwrap();
        let mut buf = vec![0u8; 200];
        f.read_at(&mut buf, 4000).unwrap();
        let at = |o: usize| 1024 + o;
        assert_eq!(&buf[..96], &data[at(2 * 4096 + 4000)..at(3 * 4096)]);
        assert_eq!(&buf[96..], &data[at(0)..at(104)]);
        assert!(f.read_at(&mut buf, 8100).is_err());
        assert!(f.write_at(&buf, 0).is_err());
    }
}
