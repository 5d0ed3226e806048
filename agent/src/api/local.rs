//! Local agents on loopback, as the demo, the benchmarks and the end-to-end tests start them:
//! free ports, a hosts file, and the `vmig agent` command line.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A free loopback TCP port (bound and released: free at the time of the call).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The hosts file's text for agents on loopback: `name = "127.0.0.1:port"` lines.
pub fn hosts_text(agents: &[(&str, u16)]) -> String {
    agents
        .iter()
        .map(|(n, p)| format!("{n} = \"127.0.0.1:{p}\"\n"))
        .collect()
}

/// One local agent's settings.
#[derive(Debug, Clone)]
pub struct LocalAgent {
    /// Agent (host) name.
    pub name: String,
    /// Migration port on 127.0.0.1.
    pub port: u16,
    /// Datastore folder.
    pub datastore: PathBuf,
    /// Hosts file.
    pub hosts: PathBuf,
    /// Folder of the control sockets (`VMIG_RUN_DIR`).
    pub run_dir: PathBuf,
    /// `--pki-dir` (mutual TLS, see [`crate::certs::cluster`]); None: `--insecure`.
    pub pki_dir: Option<PathBuf>,
}

impl LocalAgent {
    /// `exe agent --name … --listen 127.0.0.1:port --datastore … --hosts …` and
    /// `--pki-dir …` (or `--insecure`), with `VMIG_RUN_DIR` set and no stdin; the caller
    /// adds output and any other flag.
    pub fn command(&self, exe: &Path) -> Command {
        let mut c = Command::new(exe);
        c.args(["agent", "--name", &self.name])
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--datastore")
            .arg(&self.datastore)
            .arg("--hosts")
            .arg(&self.hosts)
            .env("VMIG_RUN_DIR", &self.run_dir)
            .stdin(Stdio::null());
        match &self.pki_dir {
            Some(d) => c.arg("--pki-dir").arg(d),
            None => c.arg("--insecure"),
        };
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_text_and_command_line() {
        assert_eq!(
            hosts_text(&[("hostA", 1), ("hostB", 2)]),
            "hostA = \"127.0.0.1:1\"\nhostB = \"127.0.0.1:2\"\n"
        );
        let a = LocalAgent {
            name: "hostA".into(),
            port: 7401,
            datastore: "/d".into(),
            hosts: "/h.toml".into(),
            run_dir: "/r".into(),
            pki_dir: Some("/p".into()),
        };
        let c = a.command(Path::new("/bin/vmig"));
        let args: Vec<_> = c
            .get_args()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "agent",
                "--name",
                "hostA",
                "--listen",
                "127.0.0.1:7401",
                "--datastore",
                "/d",
                "--hosts",
                "/h.toml",
                "--pki-dir",
                "/p"
            ]
        );
        assert!(c
            .get_envs()
            .any(|(k, v)| k == "VMIG_RUN_DIR" && v == Some("/r".as_ref())));
        assert!(free_port().unwrap() > 0);
    }
}
