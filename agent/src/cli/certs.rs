//! `vmig certs`: the cluster's CA and the hosts' keys and certificates, for mutual TLS
//! between agents (see `docs/security.md`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use vmig::certs::{self, Validity};

#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// Create the cluster's CA (`ca.key`, `ca.crt`) in the folder.
    Init {
        /// Folder [default: $VMIG_PKI_DIR, else /etc/vmig/pki].
        #[arg(long)]
        pki_dir: Option<PathBuf>,
        /// Validity, days.
        #[arg(long, default_value_t = 3650)]
        days: i64,
        /// Replace an existing CA (every host certificate must then be issued again).
        #[arg(long)]
        force: bool,
    },
    /// Issue HOST's key and certificate (`HOST.key`, `HOST.crt`), signed by the folder's CA.
    Issue {
        /// Host name, as in the hosts file and the agent's --name.
        host: String,
        /// Folder of the CA [default: $VMIG_PKI_DIR, else /etc/vmig/pki].
        #[arg(long)]
        pki_dir: Option<PathBuf>,
        /// Where to write the key and certificate [default: the CA's folder].
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Validity, days.
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
}

pub fn run(cmd: CertsCmd) -> Result<()> {
    match cmd {
        CertsCmd::Init {
            pki_dir,
            days,
            force,
        } => {
            let dir = pki_dir.unwrap_or_else(certs::default_dir);
            let cert = certs::init(&dir, days, force)?;
            println!(
                "created the cluster CA: {} (and {}, keep it secret: it signs host certificates)",
                cert.display(),
                dir.join(certs::CA_KEY).display()
            );
        }
        CertsCmd::Issue {
            host,
            pki_dir,
            out_dir,
            days,
        } => {
            let dir = pki_dir.unwrap_or_else(certs::default_dir);
            let out = out_dir.unwrap_or_else(|| dir.clone());
            let (cert, key) = certs::issue(&dir, &host, &out, Validity::days(days))?;
            println!(
                "issued {host}: {} and {}; copy them with {} to {host}'s --pki-dir",
                cert.display(),
                key.display(),
                dir.join(certs::CA_CERT).display()
            );
        }
    }
    Ok(())
}
