//! Relative names as they travel in offers, checked component by component.
//!
//! A name from the network is never joined to a folder before it passed these checks:
//! no absolute paths, no empty, `.` or `..` components, no NUL or control characters,
//! bounded length and depth, and nothing under barge's own staging folder. Symlinks on
//! the receiving disk are checked where the name is used (see `stage`).

use super::limits::{MAX_COMPONENT_LEN, MAX_DEPTH, MAX_PATH_LEN};
use std::path::{Path, PathBuf};

/// Name of the hidden folder, inside every import target, where jobs are staged.
pub const STAGING_DIR: &str = ".barge-staging";

/// Why a relative name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The name is empty.
    #[error("empty name")]
    Empty,
    /// The name starts with `/`.
    #[error("absolute name {0:?}")]
    Absolute(String),
    /// The name has `//` or ends with `/`.
    #[error("name {0:?} has an empty component")]
    EmptyComponent(String),
    /// A component is `.` or `..`.
    #[error("name {0:?} has a `.` or `..` component")]
    DotComponent(String),
    /// The name has a control character (a newline, say).
    #[error("name {0:?} has a control character")]
    ControlChar(String),
    /// The name is longer than the protocol allows.
    #[error("name {0:?} is longer than {MAX_PATH_LEN} bytes")]
    TooLong(String),
    /// One component is longer than the protocol allows.
    #[error("name {0:?} has a component longer than {MAX_COMPONENT_LEN} bytes")]
    ComponentTooLong(String),
    /// The name has more folders than the protocol allows.
    #[error("name {0:?} is deeper than {MAX_DEPTH} folders")]
    TooDeep(String),
    /// The name starts with [`STAGING_DIR`], the name of barge's own staging folder.
    #[error("name {0:?} is inside barge's staging folder")]
    Reserved(String),
}

/// A validated relative file name, `/`-separated.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(String);

impl RelPath {
    /// Validates `name` as a relative path confined to its folder.
    pub fn new(name: &str) -> Result<RelPath, PathError> {
        let own = || name.to_string();
        if name.is_empty() {
            return Err(PathError::Empty);
        }
        if name.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong(name.chars().take(64).collect()));
        }
        if name.starts_with('/') {
            return Err(PathError::Absolute(own()));
        }
        if name.chars().any(|c| c.is_control()) {
            return Err(PathError::ControlChar(own()));
        }
        let parts: Vec<&str> = name.split('/').collect();
        if parts.len() > MAX_DEPTH {
            return Err(PathError::TooDeep(own()));
        }
        for part in &parts {
            match *part {
                "" => return Err(PathError::EmptyComponent(own())),
                "." | ".." => return Err(PathError::DotComponent(own())),
                p if p.len() > MAX_COMPONENT_LEN => return Err(PathError::ComponentTooLong(own())),
                _ => {}
            }
        }
        if parts[0] == STAGING_DIR {
            return Err(PathError::Reserved(own()));
        }
        Ok(RelPath(name.to_string()))
    }

    /// The name as text, components joined by `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, first to last.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// `base` joined with this name (safe: the name was validated).
    pub fn under(&self, base: &Path) -> PathBuf {
        base.join(&self.0)
    }

    /// Whether `self` is a folder that contains `other` (`a` contains `a/b`).
    pub fn contains(&self, other: &RelPath) -> bool {
        other.0.len() > self.0.len() && other.0.starts_with(&self.0) && other.0.as_bytes()[self.0.len()] == b'/'
    }
}

impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_relative_names() {
        for ok in ["a", "a/b", "data/000123.sst", "x y/z.d0", ".hidden/f", "a..b"] {
            assert_eq!(RelPath::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_names_that_escape_or_are_malformed() {
        type Check = fn(&PathError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, PathError::Empty)),
            ("/etc/passwd", |e| matches!(e, PathError::Absolute(_))),
            ("../x", |e| matches!(e, PathError::DotComponent(_))),
            ("a/../../b", |e| matches!(e, PathError::DotComponent(_))),
            ("a/./b", |e| matches!(e, PathError::DotComponent(_))),
            ("a//b", |e| matches!(e, PathError::EmptyComponent(_))),
            ("a/", |e| matches!(e, PathError::EmptyComponent(_))),
            ("a\0b", |e| matches!(e, PathError::ControlChar(_))),
            ("a\nb", |e| matches!(e, PathError::ControlChar(_))),
            (".barge-staging/x", |e| matches!(e, PathError::Reserved(_))),
        ];
        for (name, want) in cases {
            let err = RelPath::new(name).unwrap_err();
            assert!(want(&err), "{name:?} gave {err:?}");
        }
    }

    #[test]
    fn refuses_names_over_the_limits() {
        let long = "a".repeat(MAX_COMPONENT_LEN + 1);
        assert!(matches!(RelPath::new(&long), Err(PathError::ComponentTooLong(_))));
        let deep = vec!["d"; MAX_DEPTH + 1].join("/");
        assert!(matches!(RelPath::new(&deep), Err(PathError::TooDeep(_))));
        let huge = vec!["d".repeat(200); 30].join("/");
        assert!(matches!(RelPath::new(&huge), Err(PathError::TooLong(_))));
    }

    #[test]
    fn containment_is_by_component() {
        let a = RelPath::new("a").unwrap();
        assert!(a.contains(&RelPath::new("a/b").unwrap()));
        assert!(!a.contains(&RelPath::new("ab").unwrap()));
        assert!(!a.contains(&a));
    }
}
