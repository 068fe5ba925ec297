//! Making certificates: a private CA and host certificates signed by it.
//!
//! A host's identity is the DNS name its certificate carries, so issuing a certificate
//! for `NAME` is how an operator creates the identity that allow lists name. Keys are
//! written with mode 0600 and never overwritten by accident: losing a CA key would
//! orphan every certificate it signed. Rotating a host's certificate replaces it only
//! when asked, by renames, so an agent reloading at that moment reads whole files.
//!
//! The CA's revocation list (`ca.crl.pem`) is written again whole on every revocation,
//! keeping the certificates revoked before and counting its CRL number up.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// How long certificates made here are valid unless asked otherwise.
pub const VALID_DAYS: u32 = 5 * 365;

/// How long a revocation list made here says it is current (its next update).
pub const CRL_DAYS: u32 = 30;

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
    /// A certificate or revocation list that does not parse, or is not this CA's.
    #[error("{path}: {reason}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A validity of zero days, or one too long to express.
    #[error("{0} days is not a usable validity (1 to 36500)")]
    BadDays(u32),
}

/// How to issue a host certificate.
#[derive(Clone, Copy, Debug)]
pub struct IssueOptions {
    /// Days it is valid for, from now.
    pub days: u32,
    /// Replace an existing certificate and key of the same name (rotation).
    pub replace: bool,
}

impl Default for IssueOptions {
    fn default() -> Self {
        IssueOptions {
            days: VALID_DAYS,
            replace: false,
        }
    }
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

/// Path of the CA's certificate revocation list in a certificate folder.
pub fn crl_path(dir: &Path) -> PathBuf {
    dir.join("ca.crl.pem")
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
    set_validity(&mut params, VALID_DAYS)?;
    let cert = params.self_signed(&key)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)
}

/// Creates `NAME.pem` and `NAME.key` signed by the CA in `dir`. The certificate names
/// `name` (its identity) and every extra DNS name or IP address in `sans`.
pub fn issue(dir: &Path, name: &str, sans: &[String]) -> Result<(), CertError> {
    issue_with(dir, name, sans, IssueOptions::default())
}

/// [`issue`] with a validity and, for rotation, leave to replace the files: the new
/// key and certificate are written beside the old ones and renamed over them.
pub fn issue_with(dir: &Path, name: &str, sans: &[String], opts: IssueOptions) -> Result<(), CertError> {
    check_dns_name(name)?;
    let (cert_path, key_path) = host_paths(dir, name);
    if !opts.replace {
        refuse_existing(&[&cert_path, &key_path])?;
    }
    let issuer = load_issuer(dir)?;
    let mut names = vec![name.to_string()];
    names.extend(sans.iter().cloned());
    let mut params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, opts.days)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    if !opts.replace {
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        return write_file(&cert_path, cert.pem().as_bytes(), 0o644);
    }
    replace_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    replace_file(&cert_path, cert.pem().as_bytes(), 0o644)
}

/// Adds the certificate `DIR/NAME.pem` to the CA's revocation list `DIR/ca.crl.pem`
/// (made if missing), which then says it is current for `days`. Returns the serial
/// number revoked, in hex. Revoking a certificate twice keeps one entry.
pub fn revoke(dir: &Path, name: &str, days: u32) -> Result<String, CertError> {
    check_dns_name(name)?;
    let issuer = load_issuer(dir)?;
    let (cert_path, _) = host_paths(dir, name);
    let serial = serial_of(&cert_path, &ca_paths(dir).0)?;
    let path = crl_path(dir);
    let (mut revoked, number) = match path.exists() {
        true => read_crl(&path)?,
        false => (vec![], 0),
    };
    let now = time::OffsetDateTime::now_utc();
    if !revoked.iter().any(|r| r.serial_number.as_ref() == serial.as_slice()) {
        revoked.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial),
            revocation_time: now,
            reason_code: None,
            invalidity_date: None,
        });
    }
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + days_of(days)?,
        crl_number: SerialNumber::from(number.max(now.unix_timestamp() as u64 - 1) + 1),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer)?;
    replace_file(&path, crl.pem()?.as_bytes(), 0o644)?;
    Ok(serial.iter().map(|b| format!("{b:02x}")).collect())
}

/// The serial number of the certificate in `path`, which must be issued by the CA in
/// `ca_path` (a revocation list can only name the CA's own certificates).
fn serial_of(path: &Path, ca_path: &Path) -> Result<Vec<u8>, CertError> {
    let bad = |reason: String| CertError::Bad {
        path: path.to_path_buf(),
        reason,
    };
    let der = CertificateDer::from_pem_file(path).map_err(|e| bad(format!("not a certificate ({e})")))?;
    let ca = CertificateDer::from_pem_file(ca_path).map_err(|e| CertError::BadCa {
        path: ca_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad(e.to_string()))?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca).map_err(|e| bad(e.to_string()))?;
    if cert.verify_signature(Some(ca.public_key())).is_err() {
        return Err(bad("not issued by this folder's CA".into()));
    }
    Ok(cert.raw_serial().to_vec())
}

/// The entries and CRL number of an existing revocation list.
fn read_crl(path: &Path) -> Result<(Vec<RevokedCertParams>, u64), CertError> {
    let bad = |reason: String| CertError::Bad {
        path: path.to_path_buf(),
        reason,
    };
    let der = CertificateRevocationListDer::from_pem_file(path).map_err(|e| bad(e.to_string()))?;
    let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| bad(e.to_string()))?;
    let entries = crl.iter_revoked_certificates().map(|r| RevokedCertParams {
        serial_number: SerialNumber::from_slice(r.raw_serial()),
        revocation_time: time::OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
            .unwrap_or_else(|_| time::OffsetDateTime::now_utc()),
        reason_code: None,
        invalidity_date: None,
    });
    let number = crl.crl_number().map(|n| n.to_bytes_be()).unwrap_or_default();
    let number = number
        .iter()
        .fold(0u64, |acc, b| acc.saturating_mul(256).saturating_add(*b as u64));
    Ok((entries.collect(), number))
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

fn set_validity(params: &mut CertificateParams, days: u32) -> Result<(), CertError> {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + days_of(days)?;
    Ok(())
}

fn days_of(days: u32) -> Result<time::Duration, CertError> {
    match days {
        1..=36500 => Ok(time::Duration::days(days.into())),
        _ => Err(CertError::BadDays(days)),
    }
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

/// Writes `path` whole beside it, then renames it over whatever is there.
fn replace_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    write_file(&tmp, data, mode)?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
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

    fn crl_entries(dir: &Path) -> (Vec<Vec<u8>>, u64) {
        let (entries, number) = read_crl(&crl_path(dir)).unwrap();
        (entries.iter().map(|e| e.serial_number.to_bytes()).collect(), number)
    }

    #[test]
    fn revocations_add_up_once_each_with_a_growing_crl_number() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        issue(dir.path(), "a", &[]).unwrap();
        issue(dir.path(), "b", &[]).unwrap();
        let a = serial_of(&dir.path().join("a.pem"), &ca_paths(dir.path()).0).unwrap();
        let b = serial_of(&dir.path().join("b.pem"), &ca_paths(dir.path()).0).unwrap();
        revoke(dir.path(), "a", 7).unwrap();
        let (first, n1) = crl_entries(dir.path());
        revoke(dir.path(), "a", 7).unwrap();
        revoke(dir.path(), "b", 7).unwrap();
        let (both, n3) = crl_entries(dir.path());
        assert_eq!(first, vec![a.clone()]);
        assert_eq!(both, vec![a, b]);
        assert!(n3 >= n1 + 2, "{n1} then {n3}");
        assert!(matches!(revoke(dir.path(), "b", 0), Err(CertError::BadDays(0))));
    }

    #[test]
    fn a_replaced_certificate_is_new_and_keeps_its_key_private() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        issue(dir.path(), "h", &[]).unwrap();
        let (cert, key) = host_paths(dir.path(), "h");
        let before = serial_of(&cert, &ca_paths(dir.path()).0).unwrap();
        let opts = IssueOptions { days: 2, replace: true };
        issue_with(dir.path(), "h", &[], opts).unwrap();
        assert_ne!(serial_of(&cert, &ca_paths(dir.path()).0).unwrap(), before);
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let pem = std::fs::read(&cert).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let left = parsed.validity().not_after.timestamp() - time::OffsetDateTime::now_utc().unix_timestamp();
        assert!((2 * 86_400 - 60..=2 * 86_400).contains(&left), "{left}");
        assert!(!dir.path().join("h.pem.new").exists() && !dir.path().join("h.key.new").exists());
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
