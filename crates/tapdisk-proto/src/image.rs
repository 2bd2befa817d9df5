//! The image argument of OPEN and RESUME (`params.path`, `tap-ctl ... -a`): `TYPE:LOCATOR`,
//! split at the first colon, as tapdisk does.
//!
//! What the locator means depends on the type. For the file-backed types ([`FILE_TYPES`]:
//! `aio`, `vhd`, the other C driver names that open a local file, and `x-chain`, whose
//! locator is a chain description file) it is a path on this machine: [`ImageLocator::File`].
//! For every other type (`nbd`, whose locator is `unix:SOCKET:exportname=NAME`, a socket
//! path, `host:port` or the id of a passed descriptor; types tapdisk does not know, such as
//! `rbd:pool/image`) it is text only the driver understands, carried verbatim:
//! [`ImageLocator::Remote`]. So `tap-ctl` makes relative *file* paths absolute (tapdisk runs
//! in `/`) and leaves every other locator alone, and an image chain follows a parent that
//! is not a local file without trying to canonicalize it.
//!
//! Parsing is pure and never fails on the locator itself: an empty locator, a relative path
//! or an unknown type is for the daemon to refuse, with the errno tapdisk uses for each.

use std::fmt;
use std::path::{Path, PathBuf};

/// Longest image type name accepted (as tapdisk).
pub const MAX_TYPE_NAME: usize = 31;

/// The `x-chain:FILE` form: not a driver but a file listing the images of a chain.
pub const X_CHAIN: &str = "x-chain";

/// Types whose locator is a local path: tapdisk's drivers that open a file or block device
/// (`aio`, `vhd`, `ram`, `qcow2`, ... including names whose drivers are not built, and the
/// filters that name a local file or socket), and [`X_CHAIN`]. `nbd` and `remus` name peers,
/// not files, and any other name is unknown: both keep their locator verbatim.
pub const FILE_TYPES: &[&str] = &[
    "aio", "sync", "vmdk", "vhdsync", "vhd", "ram", "qcow", "qcow2", "bc", "vhdi", "log", "lc",
    "lle", "llp", "valve", X_CHAIN,
];

/// Where an image lives, as its type understands it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageLocator {
    /// A file or block device on this machine (possibly relative or empty as given: the
    /// daemon requires an absolute path).
    File(PathBuf),
    /// Anything else, exactly as given: an NBD server, a storage pool and image, a URI.
    Remote(String),
}

impl ImageLocator {
    /// The locator `text` of an image of type `type_name`.
    pub fn for_type(type_name: &str, text: &str) -> Self {
        if FILE_TYPES.contains(&type_name) {
            Self::File(PathBuf::from(text))
        } else {
            Self::Remote(text.to_owned())
        }
    }

    /// The local path, for a file locator.
    pub fn as_path(&self) -> Option<&Path> {
        match self {
            Self::File(path) => Some(path),
            Self::Remote(_) => None,
        }
    }
}

impl fmt::Display for ImageLocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Remote(text) => f.write_str(text),
        }
    }
}

/// A parsed `TYPE:LOCATOR` argument. Its `Display` gives the argument back unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageSpec {
    /// The type name before the first colon (`aio`, `vhd`, `nbd`, `x-chain`, ...).
    pub type_name: String,
    /// Everything after it, as the type understands it.
    pub locator: ImageLocator,
}

/// Why an image argument is not `TYPE:LOCATOR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageSpecError {
    /// No colon at all.
    #[error("'{params}': expected TYPE:LOCATOR (e.g. vhd:/path/to/disk.vhd)")]
    NoType {
        /// The argument as given.
        params: String,
    },
    /// An empty type name, or one longer than [`MAX_TYPE_NAME`].
    #[error("'{params}': bad image type name")]
    BadTypeName {
        /// The argument as given.
        params: String,
    },
}

impl ImageSpec {
    /// Splits `params` at its first colon and reads the locator as the type says.
    pub fn parse(params: &str) -> Result<Self, ImageSpecError> {
        let (type_name, locator) =
            params
                .split_once(':')
                .ok_or_else(|| ImageSpecError::NoType {
                    params: params.to_owned(),
                })?;
        if type_name.is_empty() || type_name.len() > MAX_TYPE_NAME {
            return Err(ImageSpecError::BadTypeName {
                params: params.to_owned(),
            });
        }
        Ok(Self {
            type_name: type_name.to_owned(),
            locator: ImageLocator::for_type(type_name, locator),
        })
    }

    /// The path of a file locator that is relative (and not empty): the one `tap-ctl` makes
    /// absolute before handing it to a daemon that runs in `/`.
    pub fn relative_path(&self) -> Option<&Path> {
        self.locator
            .as_path()
            .filter(|path| !path.as_os_str().is_empty() && !path.is_absolute())
    }
}

impl fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.type_name, self.locator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(params: &str) -> ImageSpec {
        ImageSpec::parse(params).unwrap()
    }

    #[test]
    fn file_types_carry_paths() {
        let vhd = spec("vhd:/srv/disks/vm1.vhd");
        assert_eq!(vhd.type_name, "vhd");
        assert_eq!(vhd.locator, ImageLocator::File("/srv/disks/vm1.vhd".into()));
        assert_eq!(vhd.relative_path(), None);
        // Split at the first colon only: the path may hold more.
        assert_eq!(spec("aio:/a:b").locator, ImageLocator::File("/a:b".into()));
        assert_eq!(
            spec("aio:disk.img").relative_path(),
            Some(Path::new("disk.img"))
        );
        assert_eq!(
            spec("x-chain:chains/vm1").relative_path(),
            Some(Path::new("chains/vm1"))
        );
        assert_eq!(
            spec("qcow2:../a.qcow2").relative_path(),
            Some(Path::new("../a.qcow2"))
        );
        // Nothing to make absolute in an empty locator: the daemon refuses it.
        assert_eq!(spec("aio:").locator, ImageLocator::File(PathBuf::new()));
        assert_eq!(spec("aio:").relative_path(), None);
    }

    #[test]
    fn other_types_carry_text_verbatim() {
        for (params, text) in [
            (
                "nbd:unix:/run/sm/nbd/mirror.sock:exportname=vdi-1",
                "unix:/run/sm/nbd/mirror.sock:exportname=vdi-1",
            ),
            ("nbd:10.0.0.1:10809", "10.0.0.1:10809"),
            (
                "nbd:/run/blktap-control/nbd42.0",
                "/run/blktap-control/nbd42.0",
            ),
            ("rbd:pool/image", "pool/image"),
            ("remus:backup:8000", "backup:8000"),
            ("nbd:", ""),
        ] {
            let parsed = spec(params);
            assert_eq!(
                parsed.locator,
                ImageLocator::Remote(text.into()),
                "{params}"
            );
            assert_eq!(parsed.locator.as_path(), None);
            assert_eq!(parsed.relative_path(), None, "{params}");
        }
    }

    #[test]
    fn display_gives_the_argument_back() {
        for params in [
            "vhd:/srv/disks/vm1.vhd",
            "aio:relative/disk.img",
            "aio:/a//b/./c",
            "aio:",
            "x-chain:/etc/chain",
            "nbd:unix:/run/x.sock:exportname=a b",
            "rbd:pool/image@snap",
            "bogus:/x",
        ] {
            assert_eq!(spec(params).to_string(), params);
        }
    }

    #[test]
    fn malformed_arguments() {
        assert_eq!(
            ImageSpec::parse("/no/type"),
            Err(ImageSpecError::NoType {
                params: "/no/type".into()
            })
        );
        assert_eq!(
            ImageSpec::parse(":/x"),
            Err(ImageSpecError::BadTypeName {
                params: ":/x".into()
            })
        );
        let long = format!("{}:/x", "t".repeat(MAX_TYPE_NAME + 1));
        assert!(matches!(
            ImageSpec::parse(&long),
            Err(ImageSpecError::BadTypeName { .. })
        ));
        let longest = format!("{}:/x", "t".repeat(MAX_TYPE_NAME));
        assert!(ImageSpec::parse(&longest).is_ok());
        assert!(ImageSpec::parse("")
            .unwrap_err()
            .to_string()
            .contains("expected TYPE:LOCATOR"));
    }
}
