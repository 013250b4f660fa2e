//! The admin endpoint's token (`[stats] admin_auth_file`): read at load, so `check-config`
//! refuses a file the daemon would, kept out of `Debug` output, and compared in constant time.
use std::{
    fmt, fs, io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

/// Shortest token accepted: a guessable token is no better than none.
pub const MIN_TOKEN_LEN: usize = 16;

/// The token of an admin request (`Authorization: Bearer <token>`), and the file it came from.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    path: PathBuf,
    secret: String,
}

/// Masked: configs are logged and printed in test failures.
impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminToken")
            .field("path", &self.path)
            .field("secret", &"<masked>")
            .finish()
    }
}

/// Why an admin_auth_file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read admin_auth_file {path:?}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("admin_auth_file {path:?} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error(
        "admin_auth_file {path:?} is open to other users (mode {mode:04o}); `chmod o-rwx` it \
         (0600, or 0640 for a group of operators)"
    )]
    OpenToOthers { path: PathBuf, mode: u32 },
    #[error(
        "admin_auth_file {path:?} must hold one token of at least {MIN_TOKEN_LEN} visible ASCII \
         characters and no spaces (e.g. `openssl rand -hex 32`)"
    )]
    BadToken { path: PathBuf },
}

impl AdminToken {
    /// Reads the token at `path`: one line of at least [`MIN_TOKEN_LEN`] visible ASCII
    /// characters (it travels in an HTTP header), in a regular file other users cannot open.
    pub fn read(path: &Path) -> Result<Self, TokenFileError> {
        let read_error = |source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(read_error)?;
        if !meta.is_file() {
            return Err(TokenFileError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o007 != 0 {
            return Err(TokenFileError::OpenToOthers {
                path: path.to_owned(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(read_error)?;
        let secret = text.trim();
        if secret.len() < MIN_TOKEN_LEN || !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenFileError::BadToken {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            path: path.to_owned(),
            secret: secret.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The token itself, for a client that sends it (`patroxy set-state`).
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Whether `presented` is the token. Every byte is compared whatever the first difference,
    /// so the answer's timing does not tell how much of a guess was right (only its length).
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.secret.as_bytes(), presented.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        std::hint::black_box(diff) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str, mode: u32) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("patroxy-token-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn reads_one_trimmed_token_and_masks_it() {
        let token = AdminToken::read(&file("ok", "0123456789abcdef0123\n", 0o600)).unwrap();
        assert_eq!(token.secret(), "0123456789abcdef0123");
        assert!(token.matches("0123456789abcdef0123"));
        assert!(!token.matches("0123456789abcdef0124"));
        assert!(!token.matches("0123456789abcdef012"));
        assert!(!token.matches(""));
        assert!(!format!("{token:?}").contains("0123"), "{token:?}");
        assert!(AdminToken::read(&file("group", "0123456789abcdef0123", 0o640)).is_ok());
    }

    #[test]
    fn refuses_files_others_may_open_and_weak_tokens() {
        let e = AdminToken::read(&file("world", "0123456789abcdef0123", 0o644)).unwrap_err();
        assert!(
            e.to_string().contains("open to other users (mode 0644)"),
            "{e}"
        );
        let e = AdminToken::read(&file("short", "secret\n", 0o600)).unwrap_err();
        assert!(matches!(e, TokenFileError::BadToken { .. }), "{e}");
        let e = AdminToken::read(&file("space", "0123456789 abcdef0123", 0o600)).unwrap_err();
        assert!(matches!(e, TokenFileError::BadToken { .. }), "{e}");
        let e = AdminToken::read(Path::new("/nonexistent/admin.token")).unwrap_err();
        assert!(e.to_string().contains("cannot read admin_auth_file"), "{e}");
        let e = AdminToken::read(&std::env::temp_dir()).unwrap_err();
        assert!(matches!(e, TokenFileError::NotAFile { .. }), "{e}");
    }
}
