//! Making certificates: a private CA and host certificates signed by it.
//!
//! A host's identity is the DNS name its certificate carries, so issuing a certificate
//! for `NAME` is how an operator creates the identity that allow lists name. Keys are
//! written with mode 0600 and never overwritten: losing a CA key by accident would
//! orphan every certificate it signed.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// How long certificates made here are valid.
const VALID_DAYS: i64 = 5 * 365;

/// Why a certificate could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A certificate or key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file to be made is already there.
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// An identity that is not a valid DNS name.
    #[error("{0:?} is not a valid DNS name for an identity")]
    BadName(String),
    /// The CA's certificate or key can not sign.
    #[error("{path}: not a usable CA ({reason})")]
    BadCa {
        /// The CA's file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rcgen could not make a key or certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Paths of the CA files in a certificate folder.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

/// Paths of a host's certificate and key in a certificate folder.
pub fn host_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")))
}

/// Creates `ca.pem` and `ca.key` (mode 0600) in `dir`.
pub fn init_ca(dir: &Path) -> Result<(), CertError> {
    let (cert_path, key_path) = ca_paths(dir);
    refuse_existing(&[&cert_path, &key_path])?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "barge private CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params);
    let cert = params.self_signed(&key)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)
}

/// Creates `NAME.pem` and `NAME.key` signed by the CA in `dir`. The certificate names
/// `name` (its identity) and every extra DNS name or IP address in `sans`.
pub fn issue(dir: &Path, name: &str, sans: &[String]) -> Result<(), CertError> {
    check_dns_name(name)?;
    let (cert_path, key_path) = host_paths(dir, name);
    refuse_existing(&[&cert_path, &key_path])?;
    let issuer = load_issuer(dir)?;
    let mut names = vec![name.to_string()];
    names.extend(sans.iter().cloned());
    let mut params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)
}

/// Makes a CA and the named host certificates in `dir` unless they already exist.
pub fn ensure_dev_certs(dir: &Path, names: &[&str]) -> Result<bool, CertError> {
    let mut made = false;
    if !ca_paths(dir).1.exists() {
        init_ca(dir)?;
        made = true;
    }
    for name in names {
        if !host_paths(dir, name).1.exists() {
            issue(dir, name, &[])?;
            made = true;
        }
    }
    Ok(made)
}

/// Checks that `name` can serve as an identity (a DNS name).
pub fn check_dns_name(name: &str) -> Result<(), CertError> {
    match rustls_pki_types::DnsName::try_from(name) {
        Ok(_) if !name.contains('/') && !name.is_empty() => Ok(()),
        _ => Err(CertError::BadName(name.to_string())),
    }
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertError> {
    let (cert_path, key_path) = ca_paths(dir);
    let pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
    let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
    let bad = |path: &Path, e: rcgen::Error| CertError::BadCa {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(&key_path, e))?;
    Issuer::from_ca_cert_pem(&pem, key).map_err(|e| bad(&cert_path, e))
}

fn set_validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(VALID_DAYS);
}

fn refuse_existing(paths: &[&Path]) -> Result<(), CertError> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(CertError::Exists(p.to_path_buf())),
        None => Ok(()),
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_then_issue_makes_private_keys_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        issue(dir.path(), "host-a", &["127.0.0.1".into()]).unwrap();
        for key in ["ca.key", "host-a.key"] {
            let mode = std::fs::metadata(dir.path().join(key)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        assert!(matches!(init_ca(dir.path()), Err(CertError::Exists(_))));
        assert!(matches!(issue(dir.path(), "host-a", &[]), Err(CertError::Exists(_))));
    }

    #[test]
    fn issue_without_a_ca_or_with_a_bad_name_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(issue(dir.path(), "h", &[]), Err(CertError::Io { .. })));
        init_ca(dir.path()).unwrap();
        for bad in ["", "a/b", "white space", "../x"] {
            assert!(
                matches!(issue(dir.path(), bad, &[]), Err(CertError::BadName(_))),
                "{bad}"
            );
        }
    }
}
