//! `nip tls self-signed`: a key and a self-signed certificate (no CA) for trying HTTPS out. Real
//! deployments use a certificate from their CA; clients trust this one with `--ca-cert`.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

// `///` comments on the variants and fields are their `--help` text.
#[derive(Subcommand)]
pub enum TlsCommand {
    /// Write a self-signed certificate and key (cert.pem, key.pem) for trying HTTPS out
    SelfSigned(SelfSignedArgs),
}

#[derive(Args)]
pub struct SelfSignedArgs {
    /// Host name or IP address clients use (repeatable, or comma-separated), e.g.
    /// cache.internal,127.0.0.1
    #[arg(long, value_name = "HOST", required = true, value_delimiter = ',')]
    hostname: Vec<String>,
    /// Directory for cert.pem and key.pem
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: String,
    /// Overwrite existing cert.pem / key.pem
    #[arg(long)]
    force: bool,
}

pub fn run(cmd: &TlsCommand) -> Result<()> {
    match cmd {
        TlsCommand::SelfSigned(args) => {
            let hosts: Vec<String> = args
                .hostname
                .iter()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .collect();
            let (cert, key) = self_signed(&hosts, Path::new(&args.out), args.force)?;
            eprintln!("✅ Wrote {} and {}", cert.display(), key.display());
            eprintln!(
                "   serve:  nip serve --tls-cert {} --tls-key {}",
                cert.display(),
                key.display()
            );
            eprintln!(
                "   client: nip cache remote config --url https://{}:8501 --ca-cert {}",
                url_host(&hosts[0]),
                cert.display()
            );
            eprintln!(
                "   Nix:    NIX_SSL_CERT_FILE={} (or ssl-cert-file in nix.conf)",
                cert.display()
            );
            println!("{}", cert.display());
            Ok(())
        }
    }
}

/// `[::1]` for IPv6 addresses in URLs.
fn url_host(h: &str) -> String {
    match h.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(_)) => format!("[{h}]"),
        _ => h.to_string(),
    }
}

/// Writes `cert.pem` (0644) and `key.pem` (0600) into `out`; host names become DNS names, IP
/// addresses IP SANs. The first host is also the common name.
pub fn self_signed(hosts: &[String], out: &Path, force: bool) -> Result<(PathBuf, PathBuf)> {
    let Some(first) = hosts.first() else {
        bail!("give at least one --hostname");
    };
    let mut params = rcgen::CertificateParams::new(hosts.to_vec())
        .map_err(|e| anyhow::anyhow!("--hostname {hosts:?}: {e}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, first.clone());
    let key = rcgen::KeyPair::generate().context("generate a key")?;
    let cert = params.self_signed(&key).context("sign the certificate")?;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let (cert_path, key_path) = (out.join("cert.pem"), out.join("key.pem"));
    for p in [&cert_path, &key_path] {
        if p.exists() && !force {
            bail!("{} exists; pass --force to overwrite it", p.display());
        }
    }
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // Remove first: an existing file would keep its old (maybe wider) mode.
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_pair_with_ip_and_dns_names_and_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let hosts = vec!["cache.test".to_string(), "127.0.0.1".to_string()];
        let (cert, key) = self_signed(&hosts, dir.path(), false).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let files = nip_server::tls::TlsFiles {
            cert: cert.clone(),
            key,
        };
        assert!(nip_server::tls::load(&files).is_ok(), "key matches cert");
        let e = self_signed(&hosts, dir.path(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--force"), "{e}");
        assert!(self_signed(&hosts, dir.path(), true).is_ok());
        assert!(self_signed(&[], dir.path(), true).is_err());
    }
}
