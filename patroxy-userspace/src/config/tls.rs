//! The PEM files a check's `tls` names, read by the same functions for config validation (so
//! `check-config` refuses a file the checker could not use, at the position of the setting that
//! names it) and for the checker's HTTP client (so the two never disagree). Paths are used as
//! written: a relative one is relative to the working directory.
use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

/// The setting that names a file, for messages and for pointing at it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsSetting {
    CaFile,
    ClientCert,
    ClientKey,
}

impl fmt::Display for TlsSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsSetting::CaFile => "ca_file",
            TlsSetting::ClientCert => "client_cert",
            TlsSetting::ClientKey => "client_key",
        })
    }
}

/// A TLS file that cannot be used, and which setting named it.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("cannot read tls {setting} {path:?}: {source}")]
    Read {
        setting: TlsSetting,
        path: PathBuf,
        source: io::Error,
    },
    #[error("tls {setting} {path:?} {problem}")]
    Content {
        setting: TlsSetting,
        path: PathBuf,
        problem: String,
    },
}

impl TlsFileError {
    pub fn setting(&self) -> TlsSetting {
        match self {
            TlsFileError::Read { setting, .. } | TlsFileError::Content { setting, .. } => *setting,
        }
    }
}

/// The certificates of `ca_file`, the only roots a TLS check trusts: at least one, or no
/// server could ever be verified and every check would fail.
pub fn ca_certificates(path: &Path) -> Result<Vec<reqwest::Certificate>, TlsFileError> {
    let pem = read(TlsSetting::CaFile, path)?;
    let unusable = |e: &dyn std::error::Error| {
        content(
            TlsSetting::CaFile,
            path,
            format!("is unusable: {}", root_cause(e)),
        )
    };
    let roots = certificates(TlsSetting::CaFile, path, &pem)?
        .iter()
        .map(|der| reqwest::Certificate::from_der(der).map_err(|e| unusable(&e)))
        .collect::<Result<Vec<_>, _>>()?;
    // The TLS library parses a root only when it is added to a configuration.
    roots
        .iter()
        .fold(tls_client(), |b, root| b.add_root_certificate(root.clone()))
        .build()
        .map_err(|e| unusable(&e))?;
    Ok(roots)
}

/// The client identity of `client_cert` and `client_key`, checked the way the TLS library
/// will use it: certificates in one file, a private key in the other, and the key the
/// certificate's own.
pub fn identity(cert: &Path, key: &Path) -> Result<reqwest::Identity, TlsFileError> {
    let cert_pem = read(TlsSetting::ClientCert, cert)?;
    certificates(TlsSetting::ClientCert, cert, &cert_pem)?;
    let key_pem = read(TlsSetting::ClientKey, key)?;
    PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| content(TlsSetting::ClientKey, key, no_pem("private key", &e)))?;
    // reqwest wants certificates and key in one PEM buffer.
    let mut pem = cert_pem;
    pem.push(b'\n');
    pem.extend(key_pem);
    let unusable = |e: &dyn std::error::Error| {
        content(
            TlsSetting::ClientKey,
            key,
            format!("is not usable with client_cert {cert:?}: {}", root_cause(e)),
        )
    };
    let identity = reqwest::Identity::from_pem(&pem).map_err(|e| unusable(&e))?;
    // Only building a TLS configuration checks that the key is the certificate's (and that the
    // TLS library takes both): do it now rather than at the first check.
    tls_client()
        .identity(identity.clone())
        .build()
        .map_err(|e| unusable(&e))?;
    Ok(identity)
}

/// A client builder with the checker's TLS library and no other roots, to try material on.
fn tls_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
}

fn read(setting: TlsSetting, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    fs::read(path).map_err(|source| TlsFileError::Read {
        setting,
        path: path.to_owned(),
        source,
    })
}

/// The PEM certificates in `pem`, at least one.
fn certificates(
    setting: TlsSetting,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| content(setting, path, format!("is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(content(setting, path, "holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn no_pem(what: &str, e: &rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!("holds no PEM {what}"),
        e => format!("is not valid PEM: {e}"),
    }
}

fn content(setting: TlsSetting, path: &Path, problem: String) -> TlsFileError {
    TlsFileError::Content {
        setting,
        path: path.to_owned(),
        problem,
    }
}

/// The innermost error: reqwest's own message ("builder error") says nothing about the file.
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut last = e;
    while let Some(source) = last.source() {
        last = source;
    }
    last.to_string()
}
