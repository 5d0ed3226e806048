//! The control socket admits root (and `--control-group`): by its file mode, and by the
//! client's credentials (`SO_PEERCRED`) on every connection. The CLI runs as an
//! unprivileged user here (the test, as root, drops privileges in the child).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use vmig_tests::{vmig_bin, wait_for, AgentOpts, Cluster};

const NOBODY: u32 = 65534;

/// Whether the test can run (as root); prints a loud SKIPPED line when not.
fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED: {test}: it drops privileges to another user and must run as root");
    }
    root
}

/// `vmig --host hostA vm list` as uid/gid `id` (no supplementary groups).
fn list_as(c: &Cluster, uid: u32, gid: u32) -> Output {
    Command::new(vmig_bin())
        .args(["--host", "hostA", "vm", "list"])
        .env("VMIG_RUN_DIR", c.run_dir())
        .env_remove("VMIG_AGENT")
        .uid(uid)
        .gid(gid)
        .output()
        .expect("run vmig as another user")
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Lets anyone reach the run folder (a temp folder is 0700), so that only the socket's own
/// protections stand between an unprivileged user and the agent.
fn open_folders(c: &Cluster) {
    chmod(c.dir(), 0o755);
    chmod(c.run_dir(), 0o755);
}

#[test]
fn e2e_control_socket_refuses_an_unprivileged_user() {
    if !require_root("e2e_control_socket_refuses_an_unprivileged_user") {
        return;
    }
    let c = Cluster::new(&[("hostA", AgentOpts::new())]);
    open_folders(&c);
    let sock = c.run_dir().join("hostA.sock");
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!(m.mode() & 0o777, 0o600, "control socket mode");

    // The file mode stops it first.
    let o = list_as(&c, NOBODY, NOBODY);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "nobody listed the VMs: {o:?}");
    assert!(
        err.contains("permission denied on the agent's control socket"),
        "{err}"
    );

    // A careless chmod does not open it: the credentials are checked on each connection.
    chmod(&sock, 0o666);
    let o = list_as(&c, NOBODY, NOBODY);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "nobody listed the VMs: {o:?}");
    assert!(
        err.contains("admits only root") && err.contains("uid 65534"),
        "{err}"
    );
    let logged = wait_for(std::time::Duration::from_secs(5), || {
        std::fs::read_to_string(&c.agent("hostA").log)
            .ok()?
            .contains("control connection refused")
            .then_some(())
    });
    assert!(logged.is_some(), "{}", c.logs());

    // Root still drives it.
    c.ok(&["--host", "hostA", "vm", "list"]);
}

#[test]
fn e2e_control_group_members_may_drive_the_agent() {
    if !require_root("e2e_control_group_members_may_drive_the_agent") {
        return;
    }
    let group = AgentOpts {
        control_group: Some(NOBODY.to_string()),
        ..AgentOpts::new()
    };
    let c = Cluster::new(&[("hostA", group)]);
    open_folders(&c);
    let sock = c.run_dir().join("hostA.sock");
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        (m.mode() & 0o777, m.gid()),
        (0o660, NOBODY),
        "socket mode and group"
    );
    let o = list_as(&c, NOBODY, NOBODY);
    assert!(
        o.status.success(),
        "a member of the group was refused: {o:?}"
    );
    // Outside the group: refused.
    let o = list_as(&c, NOBODY - 1, NOBODY - 1);
    assert!(!o.status.success(), "a non-member listed the VMs: {o:?}");
    chmod(&sock, 0o666);
    let o = list_as(&c, NOBODY - 1, NOBODY - 1);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a non-member listed the VMs: {o:?}");
    assert!(err.contains("members of group 65534"), "{err}");
}
