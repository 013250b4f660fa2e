//! Certificates for TLS tests, made at test time with the `openssl` CLI (Debian's openssl, which
//! `cargo xtask test` installs with the other packages): a CA per test, and server certificates
//! it signs for 127.0.0.1. Nothing is checked in, so nothing expires in the repository.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::postgres::run_checked;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A test CA in its own directory (removed when dropped).
pub struct TestCa {
    dir: PathBuf,
    /// The CA's certificate (PEM): what a client trusts as `ca_file`.
    pub cert: PathBuf,
    key: PathBuf,
}

/// A certificate and its private key, both PEM files.
#[derive(Clone, Debug)]
pub struct CertKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA whose subject names `name`.
    pub fn new(name: &str) -> TestCa {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("patroxy-test-pki-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the CA's directory");
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
        openssl(
            Command::new("openssl")
                .args(["req", "-x509", "-days", "2", "-subj"])
                .arg(format!("/CN=patroxy test CA {name}"))
                .args(new_key())
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert),
        );
        TestCa { dir, cert, key }
    }

    /// A server certificate for `ip` (its subjectAltName, which the checker verifies), signed
    /// by this CA.
    pub fn server_cert(&self, ip: IpAddr) -> CertKey {
        self.sign(
            &format!("/CN={ip}"),
            &format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\n"),
        )
    }

    /// A client certificate for `name` (its CN; what etcd's `--client-cert-auth` takes as the
    /// user), signed by this CA.
    pub fn client_cert(&self, name: &str) -> CertKey {
        self.sign(&format!("/CN={name}"), "extendedKeyUsage=clientAuth\n")
    }

    /// A new key and a certificate for `subject` with `extensions`, signed by this CA.
    fn sign(&self, subject: &str, extensions: &str) -> CertKey {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let file = |ext: &str| self.dir.join(format!("cert-{n}.{ext}"));
        let (cert, key, csr, ext_file) = (file("pem"), file("key"), file("csr"), file("ext"));
        std::fs::write(
            &ext_file,
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 {extensions}"
            ),
        )
        .expect("write the extensions file");
        openssl(
            Command::new("openssl")
                .args(["req", "-new", "-subj"])
                .arg(subject)
                .args(new_key())
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&csr),
        );
        openssl(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
                .arg(&csr)
                .arg("-CA")
                .arg(&self.cert)
                .arg("-CAkey")
                .arg(&self.key)
                .arg("-extfile")
                .arg(&ext_file)
                .arg("-out")
                .arg(&cert),
        );
        CertKey { cert, key }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// openssl's arguments for a new unencrypted P-256 key (written as PKCS#8, which rustls reads).
fn new_key() -> [&'static str; 5] {
    [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ]
}

fn openssl(cmd: &mut Command) {
    if let Err(e) = run_checked(cmd, Duration::from_secs(30)) {
        panic!("openssl (apt-get install openssl; cargo xtask test installs it): {e}");
    }
}
