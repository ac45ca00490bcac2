//! How PostgreSQL failures become [`StoreError`]s, which say what the caller should do.

use pchat_store::StoreError;

/// A failure inside this crate: a PostgreSQL error not yet classified, or an already decided
/// [`StoreError`]. Exists so that `?` works on both inside the SQL code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A PostgreSQL call failed.
    #[error(transparent)]
    Pg(#[from] tokio_postgres::Error),
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
            Error::Pg(e) => classify(&e),
        }
    }
}

impl Error {
    /// The connection broke, the server is going down, or the transaction lost a deadlock or
    /// serialization race: the same work on a fresh connection may well succeed, and nothing
    /// of it was committed as long as no COMMIT was sent.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Error::Pg(e) => {
                e.is_closed()
                    || matches!(
                        sqlstate(e),
                        Some(c) if c.starts_with("08")
                            || matches!(c, "40001" | "40P01" | "57P01" | "57P02")
                    )
            }
            Error::Store(_) => false,
        }
    }

    /// The error is about one batch's data (a constraint, a value PostgreSQL refuses), not
    /// about the database: retrying the other batches of a failed group without it helps.
    pub(crate) fn is_batch_specific(&self) -> bool {
        match self {
            Error::Pg(e) => matches!(sqlstate(e).map(|c| &c[..2]), Some("22" | "23" | "54")),
            Error::Store(StoreError::Invalid(_) | StoreError::Conflict(_)) => true,
            Error::Store(_) => false,
        }
    }
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code()).filter(|c| c.len() == 5)
}

/// Maps a PostgreSQL error to what the caller should do about it.
pub(crate) fn classify(e: &tokio_postgres::Error) -> StoreError {
    let text = match e.as_db_error() {
        Some(db) => format!("PostgreSQL: {} ({})", db.message(), db.code().code()),
        None => {
            // tokio-postgres's own text ("error performing TLS handshake") leaves out why:
            // the causes say it ("certificate not valid for name …", "connection refused").
            let mut text = format!("PostgreSQL: {e}");
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            text
        }
    };
    let Some(code) = sqlstate(e) else {
        // No SQLSTATE: the connection could not be made, broke, or timed out. Nothing that
        // was not acknowledged is durable, and another try (here or elsewhere) may work.
        return StoreError::Unavailable(text);
    };
    match &code[..2] {
        // The write itself is refused by the schema: only its own batch is at fault.
        "23" if matches!(code, "23505" | "23P01") => StoreError::Conflict(text),
        "23" => StoreError::Invalid(text),
        // A value PostgreSQL cannot take (NUL in text, out of range) or a size limit.
        "22" | "54" => StoreError::Invalid(text),
        // Tables or columns missing or unlike ours: the schema was changed behind our back.
        "42" | "3F" => StoreError::Corrupt(format!(
            "{text}: the database schema is not the one this pchat installed; check it with \
             `pchat db install` (which refuses a newer schema) or restore a backup"
        )),
        "XX" if matches!(code, "XX001" | "XX002") => StoreError::Corrupt(text),
        // Connection exceptions (08), serialization failures and deadlocks (40), shutdowns,
        // statement timeouts and cancellations (57), lack of resources (53), system errors
        // (58), a standby refusing writes (25006), lock timeouts (55) and anything unexpected:
        // the database cannot take the work now; nothing was committed.
        _ => StoreError::Unavailable(text),
    }
}

/// The same error again, for each caller of a refused group (`StoreError` is not `Clone`).
pub(crate) fn copy_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(s) => StoreError::Unavailable(s.clone()),
        StoreError::Conflict(s) => StoreError::Conflict(s.clone()),
        StoreError::Corrupt(s) => StoreError::Corrupt(s.clone()),
        StoreError::Invalid(s) => StoreError::Invalid(s.clone()),
    }
}

/// A value we wrote ourselves no longer reads back: the data is not ours.
pub(crate) fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::Store(StoreError::Corrupt(what.to_string()))
}

/// Reads a column, treating a value of the wrong type or NULL where none may be as damage.
pub(crate) fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    index: usize,
) -> Result<T> {
    row.try_get(index).map_err(|e| {
        let column = row
            .columns()
            .get(index)
            .map_or("?", |c| c.name())
            .to_string();
        corrupt(format!("unreadable value in column {column}: {e}"))
    })
}
