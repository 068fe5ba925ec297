//! The wire code of every local error the peer may be told about: the disk, the files
//! sent, free space, the import hook, and a transfer as a whole. (The protocol's own
//! errors get theirs beside the code table, in [`crate::proto::wire`].) A refusal made
//! from an error is made here or there, nowhere else, and its reason is cut to the
//! wire's limit by [`crate::proto::wire::Refusal::new`].

use super::{TransferError, RETRY_SPACE};
use crate::engines::hook::HookError;
use crate::proto::wire::{code, Refusal, WireCode};
use crate::store::commit::CommitError;
use crate::store::source::SourceError;
use crate::store::space::SpaceError;
use crate::store::stage::StageError;

impl WireCode for StageError {
    fn code(&self) -> u16 {
        match self {
            StageError::Exists(_) | StageError::Differs(_) => code::EXISTS,
            StageError::Escape(_) => code::BAD_NAME,
            _ => code::IO,
        }
    }
}

impl WireCode for CommitError {
    fn code(&self) -> u16 {
        match self {
            CommitError::Place(s) => s.code(),
            _ => code::IO,
        }
    }
}

/// A hook that failed on a name (one already in the target, one that would leave it)
/// says so; any other failure is the hook's.
impl WireCode for HookError {
    fn code(&self) -> u16 {
        let stage = match self {
            HookError::Stage(s) | HookError::Commit(CommitError::Place(s)) => s.code(),
            _ => code::HOOK_FAILED,
        };
        match stage {
            code::EXISTS | code::BAD_NAME => stage,
            _ => code::HOOK_FAILED,
        }
    }
}

impl WireCode for SourceError {
    fn code(&self) -> u16 {
        match self {
            SourceError::NotFound(_) => code::NOT_FOUND,
            SourceError::BadName(_) | SourceError::Symlink(_) | SourceError::Links { .. } => code::BAD_NAME,
            SourceError::TooMany { .. } => code::LIMIT,
            SourceError::NotAligned { .. } => code::NOT_ALIGNED,
            _ => code::IO,
        }
    }
}

/// Short of space now, perhaps not in a minute.
impl WireCode for SpaceError {
    fn code(&self) -> u16 {
        code::NO_SPACE
    }

    fn retry_after(&self) -> u32 {
        RETRY_SPACE
    }
}

impl WireCode for TransferError {
    fn code(&self) -> u16 {
        self.refusal().code
    }

    /// A refusal or failure the peer sent is passed on as it was.
    fn refusal(&self) -> Refusal {
        match self {
            TransferError::Job(j) => j.refusal(),
            TransferError::Failed(r) | TransferError::Rejected(r) => r.clone(),
            TransferError::Protocol(p) => p.refusal(),
            TransferError::Wire(w) => w.refusal(),
            TransferError::Source(s) => s.refusal(),
            TransferError::Stage(s) => s.refusal(),
            other => Refusal::new(code::IO, other.to_string()),
        }
    }
}

/// Refuses with `code` for a reason that is not an error value (a plain `io::Error`,
/// a panic's message).
pub fn io_refusal(e: impl std::fmt::Display) -> Refusal {
    Refusal::new(code::IO, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_the_way_keep_their_codes_through_hooks_and_commits() {
        let exists = StageError::Exists("a".into());
        assert_eq!(exists.code(), code::EXISTS);
        assert_eq!(HookError::Commit(CommitError::Place(exists)).code(), code::EXISTS);
        assert_eq!(HookError::Stage(StageError::Escape("x".into())).code(), code::BAD_NAME);
        assert_eq!(HookError::Timeout { secs: 3 }.code(), code::HOOK_FAILED);
        let full = SpaceError::NoSpace {
            need: 2,
            free: 1,
            promised: 0,
            reserve: 0,
        };
        assert_eq!(full.refusal().retry_after, RETRY_SPACE);
        let failed = TransferError::Failed(Refusal::new(code::BUSY, "busy").retry_after(10));
        assert_eq!(failed.refusal().retry_after, 10, "a peer's refusal is passed on whole");
    }
}
