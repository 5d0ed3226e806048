//! The hosts file (host name = "ADDRESS:PORT"), and a migration's destination resolved
//! through it.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use super::{Agent, AgentError};

/// Reads a hosts file: `hostB = "127.0.0.1:7402"` lines (TOML). Every entry must be an
/// address with a port: a mistake is reported now, not at the first migration.
pub fn read_hosts(path: &Path) -> Result<HashMap<String, String>, AgentError> {
    let err = |cause: String| AgentError::Hosts {
        path: path.into(),
        cause,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let hosts: HashMap<String, String> = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
    for (name, addr) in &hosts {
        check_host_entry(name, addr).map_err(err)?;
    }
    Ok(hosts)
}

/// One hosts-file entry: a host name, and `ADDRESS:PORT` (`[v6]:PORT` for IPv6).
fn check_host_entry(name: &str, addr: &str) -> Result<(), String> {
    let name_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        return Err(format!(
            "host name {name:?}: use letters, digits, '-', '_' or '.'"
        ));
    }
    let bad = |why: &str| {
        format!("{name} = {addr:?}: {why} (write \"ADDRESS:PORT\", e.g. \"10.0.0.2:7401\")")
    };
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return match a.port() {
            0 => Err(bad("the port must be a number from 1 to 65535")),
            _ => Ok(()),
        };
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(bad("no port"));
    };
    if host.is_empty() || host.contains(':') {
        return Err(bad("not an address with a port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(bad("the port must be a number from 1 to 65535")),
    }
}

/// The other hosts of the hosts file that resolve, for the ownership questions.
pub(super) fn peers(agent: &Agent) -> crate::migrate::fence::Peers {
    let mut peers: Vec<(String, SocketAddr)> = agent
        .hosts
        .iter()
        .filter(|(name, _)| **name != agent.cfg.name)
        .filter_map(|(name, addr)| {
            let a = addr.to_socket_addrs().ok()?.next();
            if a.is_none() {
                tracing::warn!(host = %name, %addr, "a host of the hosts file does not resolve: not asked about ownership");
            }
            Some((name.clone(), a?))
        })
        .collect();
    peers.sort();
    peers
}

pub(super) fn resolve(agent: &Agent, dest: &str) -> Result<SocketAddr, String> {
    let addr = agent.hosts.get(dest).map(String::as_str).unwrap_or(dest);
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            let known: Vec<&String> = agent.hosts.keys().collect();
            format!("unknown destination {dest:?}: not in the hosts file (known: {known:?}) and not an address")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_entries_need_an_address_with_a_port() {
        for ok in ["127.0.0.1:7402", "[::1]:7402", "hostb.example:7401"] {
            check_host_entry("hostB", ok).unwrap();
        }
        for (bad, why) in [
            ("10.0.0.2", "no port"),
            ("10.0.0.2:0", "from 1 to 65535"),
            ("10.0.0.2:http", "from 1 to 65535"),
            (":7401", "not an address"),
        ] {
            let e = check_host_entry("hostB", bad).unwrap_err();
            assert!(e.contains(why) && e.contains("ADDRESS:PORT"), "{bad}: {e}");
        }
        assert!(check_host_entry("host B", "127.0.0.1:1").is_err());
    }
}
