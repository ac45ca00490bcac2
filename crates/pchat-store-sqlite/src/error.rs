//! How SQLite failures become [`StoreError`]s, which say what the caller should do.

use pchat_store::StoreError;
use rusqlite::ErrorCode;

/// A failure inside this crate: an SQLite error not yet classified, or an already decided
/// [`StoreError`]. Exists so that `?` works on both inside the SQL code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// An SQLite call failed.
    #[error(transparent)]
    Sql(#[from] rusqlite::Error),
    /// A store-level outcome decided by our own code.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result alias inside the crate.
pub(crate) type Result<T> = std::result::Result<T, Error>;

impl From<Error> for StoreError {
    fn from(e: Error) -> StoreError {
        match e {
            Error::Store(e) => e,
            Error::Sql(e) => classify(&e),
        }
    }
}

/// Maps an SQLite error to what the caller should do about it.
pub(crate) fn classify(e: &rusqlite::Error) -> StoreError {
    let text = e.to_string();
    match e {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
            // The write itself is refused by the schema: only its own batch is at fault.
            ErrorCode::ConstraintViolation => StoreError::Conflict(text),
            ErrorCode::TooBig | ErrorCode::TypeMismatch | ErrorCode::ParameterOutOfRange => {
                StoreError::Invalid(text)
            }
            // The files are damaged: retrying cannot help, an operator must look.
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => StoreError::Corrupt(text),
            // Disk full, I/O errors, locks, out of memory, and anything unexpected: the
            // database cannot take the write now, nothing was committed.
            _ => StoreError::Unavailable(text),
        },
        // Values we wrote ourselves no longer read back: the data on disk is not ours.
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::Utf8Error(..) => StoreError::Corrupt(text),
        rusqlite::Error::ToSqlConversionFailure(..) => StoreError::Invalid(text),
        _ => StoreError::Unavailable(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    #[test]
    fn classification() {
        use rusqlite::ffi;
        let check = |code, want: fn(&StoreError) -> bool| {
            let got = classify(&failure(code));
            assert!(want(&got), "code {code}: got {got:?}");
        };
        check(ffi::SQLITE_FULL, |e| {
            matches!(e, StoreError::Unavailable(_))
        });
        check(ffi::SQLITE_IOERR, |e| {
            matches!(e, StoreError::Unavailable(_))
        });
        check(ffi::SQLITE_BUSY, |e| {
            matches!(e, StoreError::Unavailable(_))
        });
        check(ffi::SQLITE_CONSTRAINT, |e| {
            matches!(e, StoreError::Conflict(_))
        });
        check(ffi::SQLITE_TOOBIG, |e| matches!(e, StoreError::Invalid(_)));
        check(ffi::SQLITE_CORRUPT, |e| matches!(e, StoreError::Corrupt(_)));
        check(ffi::SQLITE_NOTADB, |e| matches!(e, StoreError::Corrupt(_)));
    }
}
